"""Paper Fig. 4 at the embedded default: ground-truth vs residual prediction, same data and steps.

    python -m benchmarks.gt_vs_residual --params params.yaml --latents data/latents \
        --tokenizer models/tokenizer --depth 4 --out docs/gt_vs_residual.png

Trains the transformer twice from the same seed on the same cached latents and schedules,
switching only `transformer.prediction`, and plots train loss and val loss/accuracy (canonical
schedule). Writes the PNG and a JSON of the curves next to it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


from flexvar.config import load_params
from flexvar.device import pick_device
from flexvar.data.latent_cache import load_latents
from flexvar.run_logger import RunLogger
from flexvar.seeding import seed_everything
from flexvar.tokenizer.vqvae import load_tokenizer
from flexvar.transformer.model import FlexVAR
from flexvar.transformer.training import train_transformer


class Recorder(RunLogger):
    def __init__(self):
        self.rows: list[dict] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})


def run(params, prediction: str, depth: int, steps: int | None, latents: str, tokenizer: str) -> dict:
    seed_everything(params.seed)
    cfg = params.train_transformer if steps is None else params.train_transformer.model_copy(
        update={"steps": steps, "eval_every": max(1, steps // 6), "log_every": max(1, steps // 30)})
    tcfg = params.transformer_for_depth(depth).model_copy(update={"prediction": prediction})
    train, val = load_latents(latents, "train"), load_latents(latents, "val")
    quantizer = load_tokenizer(tokenizer, "cpu").quantize
    model = FlexVAR(tcfg, quantizer.codebook_size, quantizer.codebook_dim, train.num_classes, max(train.latent_hw))
    log, val_log = Recorder(), Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        train_transformer(model, quantizer, train, val, cfg, params.schedule, prediction=prediction, seed=params.seed,
                          device=pick_device(params.resources.device), out_dir=tmp, logger=log, val_logger=val_log)
    return {"train": log.rows, "val": val_log.rows}


def plot(curves: dict, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, c in curves.items():
        axes[0].plot([r["step"] for r in c["train"]], [r["loss"] for r in c["train"]], label=name)
        axes[1].plot([r["step"] for r in c["val"]], [r["val_loss"] for r in c["val"]], marker="o", label=name)
        axes[2].plot([r["step"] for r in c["val"]], [r["val_acc"] for r in c["val"]], marker="o", label=name)
    for ax, t in zip(axes, ["train loss (label-smoothed CE)", "val loss (canonical schedule)", "val top-1 token accuracy"]):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--latents", default="data/latents")
    ap.add_argument("--tokenizer", default="models/tokenizer")
    ap.add_argument("--depth", type=int, default=None, help="default: the largest of variants.depths")
    ap.add_argument("--steps", type=int, default=None, help="default: train_transformer.steps")
    ap.add_argument("--out", default="docs/gt_vs_residual.png")
    args = ap.parse_args()
    params = load_params(args.params)
    if params.resources.num_threads:
        torch.set_num_threads(params.resources.num_threads)
    depth = args.depth or max(params.variants.depths)
    curves = {f"{p} prediction": run(params, p, depth, args.steps, args.latents, args.tokenizer) for p in ("gt", "residual")}
    out = Path(args.out)
    steps = args.steps or params.train_transformer.steps
    plot(curves, out, f"FlexVAR d{depth}, embedded default data, {steps} steps, same seed/data/schedules")
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1))
    print(json.dumps({k: {"final_val_loss": v["val"][-1]["val_loss"], "final_val_acc": v["val"][-1]["val_acc"]}
                      for k, v in curves.items()}))


if __name__ == "__main__":
    main()
