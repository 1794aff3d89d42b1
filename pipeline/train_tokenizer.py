"""DVC stage `train_tokenizer`: prepared images -> multi-scale VQVAE + metrics, loss curves, recon grid.

    python -m pipeline.train_tokenizer --params params.yaml --data data/prepared --out models/tokenizer \
        --metrics metrics/tokenizer.json --plots plots/tokenizer

Resumable: a training checkpoint is written every `train_tokenizer.checkpoint_every` steps to
--ckpt-dir (outside the DVC output, which DVC clears before a run); re-running after a crash
or kill continues from it and ends with the same weights. It is deleted once the stage succeeds.

Data-parallel with `resources.train_workers` > 1 or auto (pipeline/data_parallel.py: torchrun inside
the stage; Ray Train in the flow): `train_tokenizer.batch_size` is the global batch, split into
workers x `micro_batch` x accumulation steps. Rank 0 alone evaluates and writes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from flexvar.config import load_params
from flexvar.errors import command, one_line_parser_errors
from flexvar.outputs import check_in_dir, check_out_dir, check_out_file
from flexvar.run_logger import CsvLogger, MultiLogger, RunLogger

PARAM_KEYS = ["tokenizer", "train_tokenizer", "seed", "resources.device"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    one_line_parser_errors(ap)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--data", default="data/prepared", help="prepared dataset (default: data/prepared)")
    ap.add_argument("--out", default="models/tokenizer", help="output folder for tokenizer.pt (default: models/tokenizer)")
    ap.add_argument("--metrics", default="metrics/tokenizer.json", help="metrics JSON (default: metrics/tokenizer.json)")
    ap.add_argument("--plots", default="plots/tokenizer", help="folder for loss CSVs and the recon grid (default: plots/tokenizer)")
    ap.add_argument("--ckpt-dir", default=".cache/train_tokenizer",
                    help="where the resumable training checkpoint lives (default: .cache/train_tokenizer)")
    return ap.parse_args(argv)


@command("train_tokenizer")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params, uses=PARAM_KEYS)
    for arg, path in (("--out", args.out), ("--plots", args.plots), ("--ckpt-dir", args.ckpt_dir)):
        check_out_dir(path, arg, replaces=False)   # files are written by name (atomically); nothing is deleted
    check_out_file(args.metrics, "--metrics", {".json"})
    check_in_dir(args.data, "--data", "dataset_dict.json", hint="run the prepare stage (dvc repro prepare)")
    from pipeline.data_parallel import relaunch

    rc = relaunch("pipeline.train_tokenizer", argv, params.resources.train_workers, batch_checks(params))
    if rc is not None:
        return rc
    run(params, args)
    return 0


def batch_checks(params) -> list[tuple[int, int | None, str]]:
    """(global batch, per-device micro-batch, section), checked against the workers before they start."""
    cfg = params.train_tokenizer
    return [(cfg.batch_size, None if cfg.micro_batch == "auto" else cfg.micro_batch, "train_tokenizer")]


def run(params, args: argparse.Namespace) -> None:
    import torch
    from torchvision.utils import save_image  # noqa: F401  (fail early if missing)

    from flexvar import distributed
    from flexvar.data.splits import load_split
    from flexvar.tokenizer.training import TokenizerTrainer
    from pipeline.common import setup_torch
    from pipeline.tracking import stage_run

    device = distributed.init_from_env(setup_torch(params))   # torchrun's worker: join the group, own GPU
    main_rank = distributed.is_main()
    cfg = params.train_tokenizer
    train = load_split(args.data, "train", params.data.in_memory_mb)
    val = load_split(args.data, "val", params.data.in_memory_mb)
    val_images = val.take(torch.arange(min(len(val), cfg.val_images)))   # at most val_images, whatever the split's size
    trainer = TokenizerTrainer(params.tokenizer, cfg, params.seed, train, device, num_workers=params.data.num_workers)
    ckpt = Path(args.ckpt_dir) / "train_state.pt"
    resumed = trainer.resume(ckpt)
    if resumed:
        print(f"train_tokenizer: resuming from {ckpt} at step {trainer.step}/{cfg.steps}", flush=True)
    plots = Path(args.plots)
    keep = trainer.step + 1 if resumed else None
    with stage_run("train_tokenizer", params, PARAM_KEYS, tags={"resumed_from_step": trainer.step},
                   system_metrics=True) as tracker:
        tracker.log_params({"batch.workers": distributed.rank_world()[1], "batch.micro_batch": trainer.micro_batch,
                            "batch.accumulation_steps": trainer.accum, "batch.launcher": distributed.launcher()})
        def csv(name: str) -> RunLogger:   # ranks > 0 write no plots (and track nothing: pipeline/tracking.py)
            return CsvLogger(plots / name, resume_from_step=keep) if main_rank else RunLogger()
        logger = MultiLogger([tracker, csv("loss.csv")])
        val_logger = MultiLogger([tracker, csv("val_psnr.csv")])
        t0 = time.time()
        trainer.fit(logger, val_images, ckpt, val_logger, progress=lambda s, logs: print(
            f"step {s}/{cfg.steps} loss {logs['loss']:.4f} recon {logs['recon']:.4f} "
            f"perplexity {logs['perplexity']:.1f} ({time.time() - t0:.0f}s)", flush=True))
        if not main_rank:   # the other workers' part ends with training: no evaluation, no outputs
            return
        write_outputs(params, trainer, val_images, args, tracker, device)
    ckpt.unlink(missing_ok=True)


def write_outputs(params, trainer, val_images, args, tracker, device) -> None:
    """tokenizer.pt, metrics JSON, per-scale CSV and the recon grid, from the shipped weights."""
    from torchvision.utils import save_image

    from flexvar.checkpoint import file_sha256
    from flexvar.tokenizer.vqvae import load_tokenizer, save_tokenizer
    from flexvar.tokenizer.training import evaluate_scales, recon_grid
    from pipeline.common import write_json
    from pipeline.tracking import log_tokenizer

    path = save_tokenizer(trainer.model, params.tokenizer, args.out, state_dict=trainer.final_weights(),
                          extra={"trained_steps": trainer.step})
    model = load_tokenizer(path, device, expect_config=params.tokenizer)
    full = params.latent_size
    scales = list(range(1, full + 1))
    ev = evaluate_scales(model, val_images, scales, device, trainer.precision)
    metrics = {
        "psnr": {str(s): round(e.psnr, 4) for s, e in ev["per_scale"].items()},
        "l1": {str(s): round(e.l1, 5) for s, e in ev["per_scale"].items()},
        "psnr_full": round(ev["per_scale"][full].psnr, 4),
        "psnr_mean": round(sum(e.psnr for e in ev["per_scale"].values()) / len(scales), 4),
        "codebook_usage": round(ev["usage"], 5), "codebook_perplexity": round(ev["perplexity"], 3),
        "codebook_usage_full": round(ev["usage_full"], 5), "codebook_perplexity_full": round(ev["perplexity_full"], 3),
        "steps": trainer.step, "val_images": len(val_images),
    }
    write_json(args.metrics, metrics)
    plots = Path(args.plots)
    per_scale = CsvLogger(plots / "psnr_per_scale.csv")
    for s, e in ev["per_scale"].items():
        per_scale.log_metrics({"scale": s, "psnr": e.psnr, "l1": e.l1}, step=s)
    grid = recon_grid(model, val_images[:8], scales, device)
    save_image(grid.float() / 255, plots / "recon_scales.png")
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.step)
    tracker.log_metrics({f"psnr_s{s}": e.psnr for s, e in ev["per_scale"].items()}, step=trainer.step)
    for artifact in (args.metrics, plots / "recon_scales.png", plots / "psnr_per_scale.csv"):
        tracker.log_artifact(artifact)
    log_tokenizer(tracker, model, file_sha256(path), {"psnr_full": metrics["psnr_full"], "steps": trainer.step})
    print(f"train_tokenizer: wrote {path}; val PSNR per scale "
          + " ".join(f"{s}:{e.psnr:.2f}" for s, e in ev["per_scale"].items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
