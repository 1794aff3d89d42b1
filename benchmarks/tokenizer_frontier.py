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
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexvar.config import ScheduleConfig, load_params  # noqa: E402
from flexvar.data.synthetic import BUILTIN, render_shapes  # noqa: E402
from flexvar.tokenizer.training import TokenizerTrainer, evaluate_scales  # noqa: E402
from flexvar.schedules import sampler_config  # noqa: E402


def builtin_images(name: str, n: int, resolution: int, seed: int) -> torch.Tensor:
    """The built-in split as prepare renders it, as uint8 (N, 3, H, W)."""
    import numpy as np

    images, _ = render_shapes(n, resolution, seed, BUILTIN[name], name)
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=2)
def splits(source: str, num_train: int, num_val: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and val images of a builtin source (val from prepare's val seed), rendered once per data setting."""
    kind, name = source.split(":", 1)
    if kind != "builtin":
        raise SystemExit(f"data.source: the frontier renders builtin datasets only, got {source!r}")
    return (builtin_images(name, num_train, resolution, seed),
            builtin_images(name, num_val, resolution, seed + 1_000_003))


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


def run_setting(name: str, spec: str, raw: dict, steps: int, n_val: int, tmp: Path, curve_at: set[int]) -> dict:
    """Train one setting, time it (evaluations on the way excluded), measure every scale at the end."""
    raw = json.loads(json.dumps(raw))
    raw["train_tokenizer"]["steps"] = steps          # the setting may override it
    raw = override(raw, spec)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    d = params.data                                  # the setting may override data.source / resolution
    train, val = splits(d.source, d.num_train, d.num_val, d.resolution, params.seed)
    val = val[:n_val]
    trainer = TokenizerTrainer(params.tokenizer, params.train_tokenizer, params.seed, train, torch.device("cpu"))
    full = train.shape[-1] // trainer.model.downsample
    load0, t0, cpu0, paused, paused_cpu, curve = os.getloadavg()[0], time.time(), time.process_time(), 0.0, 0.0, []
    while trainer.step < params.train_tokenizer.steps:
        trainer.train_step()
        if trainer.step in curve_at and trainer.step < params.train_tokenizer.steps:   # a point on the way
            e0, c0 = time.time(), time.process_time()
            ev = evaluate_scales(trainer.model, val, [full], torch.device("cpu"), trainer.precision)
            curve.append({"step": trainer.step, "cpu_minutes": round((c0 - cpu0 - paused_cpu) / 60, 2),
                          "psnr_full": round(ev["per_scale"][full].psnr, 2)})
            print(json.dumps({"setting": name, **curve[-1]}), flush=True)
            paused, paused_cpu = paused + time.time() - e0, paused_cpu + time.process_time() - c0
    minutes, cpu_minutes = (time.time() - t0 - paused) / 60, (time.process_time() - cpu0 - paused_cpu) / 60
    ev = evaluate_scales(trainer.model, val, list(range(1, full + 1)), torch.device("cpu"), trainer.precision)
    return {"setting": name, "overrides": spec, "steps": params.train_tokenizer.steps,
            "source": d.source, "resolution": d.resolution, "batch_size": params.train_tokenizer.batch_size,
            "downsample": trainer.model.downsample, "latent": full,
            "tokens_canonical": sampler_config(params.schedule, full).max_tokens,   # what the transformer and sampler pay
            "params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
            "train_minutes": round(minutes, 2), "train_cpu_minutes": round(cpu_minutes, 2), "s_per_step": round(minutes * 60 / params.train_tokenizer.steps, 3),
            "psnr_full": round(ev["per_scale"][full].psnr, 2),
            "psnr_per_scale": {s: round(e.psnr, 2) for s, e in ev["per_scale"].items()},
            "usage": round(ev["usage"], 3), "load_start": load0, "load_end": os.getloadavg()[0],
            "threads": torch.get_num_threads(), "curve": curve}


def _with_ci(row: dict, key: str, digits: int) -> str:
    """'value [low, high]' for a setting taken through a transformer (keys added to its row by hand), else '-'."""
    if key not in row:
        return "-"
    return f"{row[key]:.{digits}f} [{row[key + '_ci_low']:.{digits}f}, {row[key + '_ci_high']:.{digits}f}]"


def markdown(rows: list[dict]) -> str:
    """The frontier table: one row per setting, wall and CPU minutes, the load seen, PSNR at full scale and per scale."""
    head = ["setting", "overrides", "data", "steps", "latent", "tokens (full / canonical)", "params (M)", "train min (wall)", "train min (CPU)", "load",
            "PSNR full (dB)", "PSNR per scale 1..n (dB)", "usage", "class acc d4 canonical [CI]", "FID domain [CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_scale = " / ".join(f"{v:.1f}" for _, v in sorted(r["psnr_per_scale"].items(), key=lambda kv: int(kv[0])))
        lines.append("| " + " | ".join([
            r["setting"], f"`{r['overrides'] or '(params.yaml)'}`",
            f"{r.get('source', 'builtin:shapes').split(':')[-1]} {r.get('resolution', 64)} px", str(r["steps"]), f"{r['latent']}x{r['latent']}",
            f"{r['latent'] ** 2} / {r.get('tokens_canonical') or sampler_config(ScheduleConfig(), r['latent']).max_tokens}",
            f"{r['params_M']:.2f}", f"{r['train_minutes']:.1f}", f"{r['train_cpu_minutes']:.1f}",
            f"{r['load_start']:.0f}-{r['load_end']:.0f}", f"{r['psnr_full']:.2f}", per_scale, f"{r['usage']:.3f}",
            _with_ci(r, "class_acc_domain", 3), _with_ci(r, "fid_domain", 2)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=300, help="steps per setting unless it sets train_tokenizer.steps")
    ap.add_argument("--val", type=int, default=256, help="val images for PSNR")
    ap.add_argument("--setting", action="append", default=[],
                    help="NAME=key=value;key=value (may repeat); data.source / data.resolution render that data")
    ap.add_argument("--curve", type=int, nargs="*", default=[],
                    help="also measure full-scale PSNR after these steps (same run: the LR schedule is the full run's)")
    ap.add_argument("--out", default="tokenizer_frontier.jsonl")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]))
        return 0
    raw = yaml.safe_load(Path(args.params).read_text())
    tmp = Path(args.out).parent / ".frontier_params"
    tmp.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for setting in args.setting:
            name, spec = setting.split("=", 1)
            row = run_setting(name, spec, raw, args.steps, args.val, tmp, set(args.curve))
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
