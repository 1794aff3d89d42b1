"""DVC stage `train_transformer@{depth}`: FlexVAR transformer of one depth on cached latents.

    python -m pipeline.train_transformer --depth 2 --params params.yaml --latents data/latents \
        --tokenizer models/tokenizer --out models/d2 --metrics metrics/train/d2.json --plots plots/train/d2

Writes OUT/flexvar.pt (what generation loads: flexvar.transformer.checkpoint.load_flexvar), the
metrics JSON (final val loss / token accuracy overall and per scale, speed) and PLOTS/train.csv,
PLOTS/val.csv. A killed run resumes from OUT/resume.pt when rerun with the same settings.

Data-parallel with `resources.train_workers` > 1 or auto (pipeline/data_parallel.py: torchrun inside
the stage; Ray Train in the flow): `train_transformer.batch_size` is the global batch, split into
workers x `micro_batch` x accumulation steps. Rank 0 alone evaluates and writes.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.common import setup_torch, stage_args, write_json
from pipeline.data_parallel import relaunch
from pipeline.env import retain_freed_memory

from flexvar import distributed
from flexvar.checkpoint import file_sha256
from flexvar.config import load_params
from flexvar.errors import command
from flexvar.outputs import check_out_dir, check_out_file
from flexvar.run_logger import CsvLogger, LineLogger, MultiLogger, RunLogger
from flexvar.schedules import ScheduleSampler
from flexvar.transformer.checkpoint import save_flexvar
from flexvar.transformer.training import RESUME_FILE, evaluate, plan_batches, resume_state, train_transformer
from flexvar.transformer.training_run import setup_run
from pipeline.tracking import log_transformer, stage_run

PARAM_KEYS = ["seed", "transformer", "schedule", "train_transformer"]


def parse(argv):
    return stage_args(__doc__, argv,
                      depth={"type": int, "required": True, "help": "transformer depth (one of variants.depths)"},
                      latents={"default": "data/latents", "help": "cached latents folder (extract_latents)"},
                      tokenizer={"default": "models/tokenizer", "help": "tokenizer folder (train_tokenizer)"},
                      out={"default": None, "help": "model folder (default models/d{depth})"},
                      metrics={"default": None, "help": "metrics JSON (default metrics/train/d{depth}.json)"},
                      plots={"default": None, "help": "plots folder (default plots/train/d{depth})"})


def batch_checks(params) -> list[tuple[int, int | None, str]]:
    """(global batch, per-device micro-batch or None for auto, section): checked against the workers
    before they start (pipeline/data_parallel.py, flows/ray_train.py)."""
    cfg = params.train_transformer
    return [(cfg.batch_size, None if cfg.micro_batch == "auto" else cfg.micro_batch, "train_transformer")]


@command("train_transformer")
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    d = args.depth
    out = Path(args.out or f"models/d{d}")
    metrics_path = Path(args.metrics or f"metrics/train/d{d}.json")
    plots = Path(args.plots or f"plots/train/d{d}")
    params = load_params(args.params, uses=PARAM_KEYS)
    check_out_dir(out, replaces=False)   # persist: holds resume.pt; files are replaced by name
    check_out_dir(plots, "--plots", replaces=False)
    check_out_file(metrics_path, "--metrics", {".json"})
    cfg = params.train_transformer
    rc = relaunch("pipeline.train_transformer", argv, params.resources.train_workers, batch_checks(params))
    if rc is not None:
        return rc
    device = distributed.init_from_env(setup_torch(params))   # torchrun's worker: join the group, own GPU
    main_rank = distributed.is_main()
    retain_freed_memory()   # 4-12% faster CPU train steps: no page faults on reallocated activations
    run = setup_run(params, d, args.latents, args.tokenizer)   # latents memory-mapped when large
    model, quantizer, train, val, tcfg, sha = (run.model, run.quantizer, run.train, run.val, run.transformer,
                                               run.tokenizer_sha256)
    fingerprint = run.fingerprint(cfg, params)
    resumed = resume_state(out, fingerprint)
    start = resumed["step"] if resumed else None
    t0 = time.perf_counter()
    with stage_run("train_transformer", params, PARAM_KEYS, variant=f"d{d}", system_metrics=True) as log:
        log.log_metrics({"num_params": model.num_params()})
        # ranks > 0 write nothing (their `log` is untracked too: pipeline/tracking.py)
        train_csv = CsvLogger(plots / "train.csv", resume_from_step=start) if main_rank else RunLogger()
        val_csv = CsvLogger(plots / "val.csv", resume_from_step=start) if main_rank else RunLogger()
        line = (LineLogger(f"train_transformer d{d}", cfg.steps, ("loss", "images_per_s", "val_loss", "val_acc"))
                if main_rank else RunLogger())
        result = train_transformer(
            model, quantizer, train, val, cfg, params.schedule, prediction=tcfg.prediction, seed=params.seed,
            device=device, out_dir=out, logger=MultiLogger([log, train_csv, line]),
            val_logger=MultiLogger([log, val_csv, line]), fingerprint=fingerprint,
            parallelism=params.resources.parallelism)
        if not main_rank:   # the other workers' part ends with training: no final evaluation, no outputs
            return 0
        metrics = result.metrics or final_eval(model, quantizer, val, params, device)
        path = save_flexvar(out, model, latent_hw=train.latent_hw, downsample=params.tokenizer.downsample,
                            tokenizer_dir=args.tokenizer, tokenizer_sha256=sha, class_names=train.class_names,
                            extra={"step": result.step, "prediction": tcfg.prediction})
        (out / RESUME_FILE).unlink(missing_ok=True)
        summary = {"depth": d, "num_params": model.num_params(), "steps": result.step,
                   "train_loss": result.history[-1]["loss"] if result.history else None,
                   "seconds": time.perf_counter() - t0, **metrics}
        write_json(metrics_path, summary)
        for artifact in (metrics_path, plots / "train.csv", plots / "val.csv"):
            log.log_artifact(artifact)
        log_transformer(log, model, d, file_sha256(path), {"val_loss": summary["val_loss"], "steps": result.step})
    print(f"train_transformer: d{d} wrote {path}: val_loss={summary['val_loss']:.4f} "
          f"val_acc={summary['val_acc']:.4f} in {summary['seconds']:.0f}s")
    return 0


def final_eval(model, quantizer, val, params, device) -> dict:
    """Val metrics when the loop had nothing left to run (resumed at the last step)."""
    sampler = ScheduleSampler(params.schedule, val.latent_hw, params.seed)
    cfg = params.train_transformer
    micro, _ = plan_batches(model, cfg, sampler.cfg.max_tokens, device)   # in micro-batches, as training
    return evaluate(model, quantizer, val, sampler.to_hw(sampler.cfg.canonical),
                    params.transformer.prediction, cfg.batch_size, cfg.val_batches, device, cfg.precision, micro)


if __name__ == "__main__":
    sys.exit(main())
