"""Tokenizer quality vs minutes: short TokenizerTrainer runs on the built-in dataset, one per setting.

Each setting overrides params.yaml's `tokenizer` / `train_tokenizer` sections (dotted keys); the script
trains it for its steps, then measures val PSNR at every scale on `--val` val images and prints one
JSON line per setting (wall and CPU minutes of training, seconds per step, PSNR at every scale, codebook
usage) plus the machine's load average, so figures taken on a shared machine say so; CPU minutes (this
process's CPU time) are the load-independent cost.

    python benchmarks/tokenizer_frontier.py --params params.yaml --steps 300 --out frontier.jsonl \
        --setting base= --setting ch32=tokenizer.ch=32 --setting lr4e-3=train_tokenizer.lr=0.004
    python benchmarks/tokenizer_frontier.py --out frontier.jsonl --table     # the markdown table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexvar.config import load_params  # noqa: E402
from flexvar.data.synthetic import BUILTIN, render_shapes  # noqa: E402
from flexvar.tokenizer.training import TokenizerTrainer, evaluate_scales  # noqa: E402


def builtin_images(name: str, n: int, resolution: int, seed: int) -> torch.Tensor:
    """The built-in split as prepare renders it, as uint8 (N, 3, H, W)."""
    import numpy as np

    images, _ = render_shapes(n, resolution, seed, BUILTIN[name])
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def override(raw: dict, spec: str) -> dict:
    """'a.b=1,c.d=[1,2]' applied to a copy of the raw params dict (values parsed as YAML)."""
    out = json.loads(json.dumps(raw))
    for item in filter(None, spec.split(";")):
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = yaml.safe_load(value)
    return out


def run_setting(name: str, spec: str, raw: dict, steps: int, train, val, tmp: Path) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["train_tokenizer"]["steps"] = steps          # the setting may override it
    raw = override(raw, spec)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    trainer = TokenizerTrainer(params.tokenizer, params.train_tokenizer, params.seed, train, torch.device("cpu"))
    load0, t0, cpu0 = os.getloadavg()[0], time.time(), time.process_time()
    while trainer.step < params.train_tokenizer.steps:
        trainer.train_step()
    minutes, cpu_minutes = (time.time() - t0) / 60, (time.process_time() - cpu0) / 60
    full = train.shape[-1] // trainer.model.downsample
    ev = evaluate_scales(trainer.model, val, list(range(1, full + 1)), torch.device("cpu"), trainer.precision)
    return {"setting": name, "overrides": spec, "steps": params.train_tokenizer.steps,
            "downsample": trainer.model.downsample, "latent": full,
            "params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
            "train_minutes": round(minutes, 2), "train_cpu_minutes": round(cpu_minutes, 2), "s_per_step": round(minutes * 60 / params.train_tokenizer.steps, 3),
            "psnr_full": round(ev["per_scale"][full].psnr, 2),
            "psnr_per_scale": {s: round(e.psnr, 2) for s, e in ev["per_scale"].items()},
            "usage": round(ev["usage"], 3), "load_start": load0, "load_end": os.getloadavg()[0],
            "threads": torch.get_num_threads()}


def markdown(rows: list[dict]) -> str:
    """The frontier table: one row per setting, wall and CPU minutes, the load seen, PSNR at full scale and per scale."""
    head = ["setting", "overrides", "steps", "latent", "params (M)", "train min (wall)", "train min (CPU)", "load",
            "PSNR full (dB)", "PSNR per scale 1..n (dB)", "usage"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_scale = " / ".join(f"{v:.1f}" for _, v in sorted(r["psnr_per_scale"].items(), key=lambda kv: int(kv[0])))
        lines.append("| " + " | ".join([
            r["setting"], f"`{r['overrides'] or '(params.yaml)'}`", str(r["steps"]), f"{r['latent']}x{r['latent']}",
            f"{r['params_M']:.2f}", f"{r['train_minutes']:.1f}", f"{r['train_cpu_minutes']:.1f}",
            f"{r['load_start']:.0f}-{r['load_end']:.0f}", f"{r['psnr_full']:.2f}", per_scale, f"{r['usage']:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=300, help="steps per setting unless it sets train_tokenizer.steps")
    ap.add_argument("--val", type=int, default=256, help="val images for PSNR")
    ap.add_argument("--setting", action="append", default=[], help="NAME=key=value;key=value (may repeat)")
    ap.add_argument("--out", default="tokenizer_frontier.jsonl")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]))
        return 0
    raw = yaml.safe_load(Path(args.params).read_text())
    params = load_params(args.params)
    data = params.data
    name = data.source.split(":", 1)[1]
    train = builtin_images(name, data.num_train, data.resolution, params.seed)
    val = builtin_images(name, data.num_val, data.resolution, params.seed + 1_000_003)[: args.val]
    tmp = Path(args.out).parent / ".frontier_params"
    tmp.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for setting in args.setting:
            name, spec = setting.split("=", 1)
            row = run_setting(name, spec, raw, args.steps, train, val, tmp)
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
