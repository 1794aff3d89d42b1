"""Peak memory and throughput of every stage at two dataset sizes: is memory independent of N?

    python benchmarks/scale_memory.py --sizes 10000 100000 --root /tmp/scale [--train-workers 2]

For each N: a fresh work folder with params.yaml (builtin:shapes at 64 px, N train images, the
streaming path forced with data.in_memory_mb: 0, a few steps per training stage), then the real
stage commands one after another: prepare, train_tokenizer, extract_latents, train_transformer,
train_feature_net, reference_stats, sample (1,000 images), evaluate. Each stage is a subprocess
whose whole process tree (DataLoader / prepare workers, Ray workers) is polled with psutil every
0.1 s; reported per stage: peak RSS of the tree (sum), peak RSS of its largest process, peak
private memory (USS-like: RssAnon) of the tree, wall time and throughput. Figures are printed as a
table and written to <root>/scale_memory.json.

--train-workers 2 runs train_tokenizer and train_transformer through flows/ray_train (Ray Train,
2 workers) and reports each worker's peak RSS; the tokenizer's samplers trace the items each rank
read (FLEXVAR_DATA_TRACE), and the script checks the two ranks read disjoint items in every epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def params_for(n: int, args) -> dict:
    from flexvar.config import Params

    p = Params().model_dump(mode="json")
    p["data"].update(resolution=64, num_train=n, num_val=args.num_val, num_workers=args.num_workers,
                     in_memory_mb=args.in_memory_mb)
    p["train_tokenizer"].update(steps=args.steps, batch_size=16, checkpoint_every=args.steps, eval_every=args.steps,
                                log_every=1, val_images=64, warmup_steps=1)
    p["train_transformer"].update(steps=args.steps, batch_size=32, checkpoint_every=args.steps,
                                  eval_every=args.steps, log_every=1, val_batches=1, warmup_steps=1)
    p["transformer"].update(depth=2)
    p["sample"].update(per_class=args.samples // 8, batch_size=100, schedules={"short": {"steps": 4}})
    p["variants"].update(depths=[2], schedules=["short"])
    p["evaluate"].update(feature_net_steps=args.steps, kid_subset_size=100)
    p["resources"].update(device="cpu", num_threads=1, train_workers=args.train_workers,
                          stages={"train_tokenizer": {"num_cpus": 0.5}, "train_transformer": {"num_cpus": 0.5}})
    p["tracking"].update(uri="sqlite:///mlflow.db", required=False)
    return p


def stage_commands(train_workers: int) -> list[tuple[str, list[str], int]]:
    """(stage, argv after `python`, items processed per run for throughput)."""
    dp = ["-m", "flows.ray_train", sys.executable] if train_workers > 1 else []
    return [
        ("prepare", ["-m", "pipeline.prepare", "--params", "params.yaml", "--out", "data/prepared"], 0),
        ("train_tokenizer", dp + ["-m", "pipeline.train_tokenizer", "--params", "params.yaml", "--data",
                                  "data/prepared", "--out", "models/tokenizer", "--metrics", "metrics/tokenizer.json",
                                  "--plots", "plots/tokenizer", "--ckpt-dir", ".cache/train_tokenizer"], 0),
        ("extract_latents", ["-m", "pipeline.extract_latents", "--params", "params.yaml", "--prepared",
                             "data/prepared", "--tokenizer", "models/tokenizer", "--out", "data/latents"], 0),
        ("train_transformer", dp + ["-m", "pipeline.train_transformer", "--depth", "2", "--params", "params.yaml",
                                    "--latents", "data/latents", "--tokenizer", "models/tokenizer", "--out",
                                    "models/d2", "--metrics", "metrics/train/d2.json", "--plots", "plots/train/d2"], 0),
        ("train_feature_net", ["-m", "pipeline.train_feature_net", "--params", "params.yaml", "--prepared",
                               "data/prepared"], 0),
        ("reference_stats", ["-m", "pipeline.reference_stats", "--params", "params.yaml", "--prepared",
                             "data/prepared"], 0),
        ("sample", ["-m", "pipeline.sample", "--params", "params.yaml", "--depth", "2", "--schedule", "short",
                    "--model", "models/d2", "--out", "samples/d2/short"], 0),
        ("evaluate", ["-m", "pipeline.evaluate", "--params", "params.yaml", "--depth", "2", "--schedule", "short"], 0),
    ]


def rss_anon(p: psutil.Process) -> int:
    """Private resident memory (RssAnon) of a process, bytes; mapped files and the page cache excluded."""
    try:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class TreeMonitor(threading.Thread):
    """Polls a process and all its descendants: peak summed RSS, peak single-process RSS, peak summed
    RssAnon, and per-process peaks keyed by (pid, a short command)."""

    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.every, self.stop = psutil.Process(pid), every, threading.Event()
        self.peak_tree = self.peak_one = self.peak_anon = 0
        self.per_proc: dict[int, dict] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            tree = anon = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline()[:4])[:80]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                a = rss_anon(p)
                tree, anon = tree + rss, anon + a
                self.peak_one = max(self.peak_one, rss)
                rec = self.per_proc.setdefault(p.pid, {"cmd": name, "rss": 0, "anon": 0})
                rec["rss"], rec["anon"] = max(rec["rss"], rss), max(rec["anon"], a)
            self.peak_tree, self.peak_anon = max(self.peak_tree, tree), max(self.peak_anon, anon)
            time.sleep(self.every)


def run_stage(work: Path, argv: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    mon = TreeMonitor(proc.pid)
    mon.start()
    out, _ = proc.communicate()
    mon.stop.set()
    mon.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{out[-4000:]}")
    workers = [r for r in mon.per_proc.values() if "ray::" in r["cmd"] or "RayTrainWorker" in r["cmd"]
               or "_call_on_worker" in r["cmd"]]
    return {"seconds": round(seconds, 1), "peak_tree_rss_mb": round(mon.peak_tree / 2**20, 1),
            "peak_process_rss_mb": round(mon.peak_one / 2**20, 1),
            "peak_tree_private_mb": round(mon.peak_anon / 2**20, 1),
            "ray_workers": sorted(({"cmd": r["cmd"], "peak_rss_mb": round(r["rss"] / 2**20, 1),
                                    "peak_private_mb": round(r["anon"] / 2**20, 1)} for r in workers),
                                  key=lambda r: -r["peak_rss_mb"])[:4],
            "log_tail": out[-600:]}


def items_per_run(stage: str, n: int, args) -> int:
    return {"prepare": n + args.num_val, "train_tokenizer": args.steps * 16, "extract_latents": n + args.num_val,
            "train_transformer": args.steps * 32, "train_feature_net": args.steps * 64,
            "reference_stats": args.num_val, "sample": args.samples, "evaluate": args.samples}[stage]


def disjoint_epochs(trace: Path, n: int, batch: int, steps: int) -> dict:
    """From the tokenizer samplers' traces: items per rank per epoch, and whether the ranks overlapped."""
    per_rank = {}
    for f in sorted(trace.glob("rank*.txt")):
        rows = [list(map(int, line.split())) for line in f.read_text().splitlines()]
        per_rank[f.stem] = {r[0]: r[1:] for r in rows if r[0] < steps}
    if len(per_rank) < 2:
        return {"ranks": list(per_rank)}
    per_epoch = n // batch
    out = {"ranks": list(per_rank), "steps_traced": steps, "epochs": {}}
    for epoch in sorted({s // per_epoch for s in range(steps)}):
        sets = [set(i for s, items in r.items() if s // per_epoch == epoch for i in items) for r in per_rank.values()]
        out["epochs"][epoch] = {"items_per_rank": [len(s) for s in sets],
                                "overlap": len(set.intersection(*sets))}
    return out


def run_size(n: int, args) -> dict:
    work = Path(args.root) / f"n{n}_w{args.train_workers}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params_for(n, args)))
    trace = work / "data_trace"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEXVAR_PIPELINE_RUN_ID": f"scale-{n}",
           "FLEXVAR_DATA_TRACE": str(trace), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "RAY_USAGE_STATS_ENABLED": "0"}
    results = {}
    done_file = work / "results.json"
    if done_file.exists():
        results = json.loads(done_file.read_text())
    for stage, argv, _ in stage_commands(args.train_workers):
        if stage in results or (args.stages and stage not in args.stages):
            continue
        if stage == "train_tokenizer":
            for f in trace.glob("rank*.txt"):
                f.unlink()
        r = run_stage(work, argv, env)
        r["items"] = items_per_run(stage, n, args)
        r["items_per_s"] = round(r["items"] / r["seconds"], 2)
        results[stage] = r
        print(f"N={n} workers={args.train_workers} {stage}: {r['seconds']}s, peak tree RSS {r['peak_tree_rss_mb']} MB, "
              f"largest process {r['peak_process_rss_mb']} MB, private {r['peak_tree_private_mb']} MB, "
              f"{r['items_per_s']} items/s", flush=True)
        if stage == "train_tokenizer":
            r["rank_items"] = disjoint_epochs(trace, n, 16, args.steps)
        done_file.write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--root", default="/tmp/flexvar-scale")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--num-val", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--num-workers", type=int, default=1, help="data.num_workers")
    ap.add_argument("--in-memory-mb", type=float, default=0, help="data.in_memory_mb (0: always stream)")
    ap.add_argument("--train-workers", type=int, default=1, help="resources.train_workers")
    ap.add_argument("--stages", nargs="*", default=None, help="only these stages (results are kept per folder)")
    args = ap.parse_args()
    allres = {n: run_size(n, args) for n in args.sizes}
    out = Path(args.root) / f"scale_memory_w{args.train_workers}.json"
    out.write_text(json.dumps({str(k): v for k, v in allres.items()}, indent=1))
    stages = [s for s, _, _ in stage_commands(args.train_workers)]
    print(f"\n| stage | " + " | ".join(f"N={n} tree RSS MB | largest MB | private MB | items/s" for n in args.sizes)
          + " | ratio (tree) |")
    print("|---" * (2 + 4 * len(args.sizes)) + "|")
    for s in stages:
        rows = [allres[n].get(s) for n in args.sizes]
        if not all(rows):
            continue
        cells = " | ".join(f"{r['peak_tree_rss_mb']} | {r['peak_process_rss_mb']} | {r['peak_tree_private_mb']} | "
                           f"{r['items_per_s']}" for r in rows)
        ratio = rows[-1]["peak_tree_rss_mb"] / rows[0]["peak_tree_rss_mb"]
        print(f"| {s} | {cells} | {ratio:.2f} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
