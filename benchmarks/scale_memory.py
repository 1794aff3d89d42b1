"""Peak memory and throughput of every stage at two dataset sizes: is memory independent of N?

    python benchmarks/scale_memory.py --sizes 10000 100000 --root /tmp/scale [--train-workers 2]

For each N: a fresh work folder with params.yaml (builtin:shapes at 64 px, N train images, the
streaming path forced with data.in_memory_mb: 0, a few steps per training stage), then the real
stage commands one after another: prepare, train_tokenizer, extract_latents, train_transformer,
train_feature_net, reference_stats, sample (1,000 images), evaluate. Each stage is a subprocess
whose whole process tree (DataLoader / prepare workers, Ray workers) is polled every 0.2 s
(/proc/<pid>/smaps_rollup); reported per stage: peak PSS of the tree (shared pages counted once),
peak private memory of the tree (Pss_Anon: without mapped files / page cache), peak RSS of its
largest process, wall time and throughput. Figures are printed as a
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
DP_LAUNCHER = "ray"
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
    p["tokenizer"].update(ch=args.tokenizer_ch)   # the encoder's width sets extract_latents' time, not its data memory
    p["transformer"].update(depth=2)
    p["sample"].update(per_class=args.samples // 8, batch_size=100, schedules={"short": {"steps": 4}})
    p["variants"].update(depths=[2], schedules=["short"])
    p["evaluate"].update(feature_net_steps=args.steps, kid_subset_size=100)
    p["resources"].update(device="cpu", num_threads=1, train_workers=args.train_workers,
                          stages={"train_tokenizer": {"num_cpus": 0.5}, "train_transformer": {"num_cpus": 0.5}})
    p["tracking"].update(uri="sqlite:///mlflow.db", required=False)
    return p


def stage_commands(train_workers: int) -> list[tuple[str, list[str], int]]:
    """(stage, argv after `python`, items processed per run for throughput). With several train
    workers the training stages run under DP_LAUNCHER (flows.ray_train, or torchrun + dp_stage.py) and
    write models/tokenizer_dp and models/d2_dp, so the 1-worker run's outputs stay valid."""
    if train_workers == 1:
        dp, tok_out, d2_out = [], "models/tokenizer", "models/d2"
    else:
        tok_out, d2_out = "models/tokenizer_dp", "models/d2_dp"
        dp = (["-m", "flows.ray_train", sys.executable, "-m"] if DP_LAUNCHER == "ray" else
              ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={train_workers}",
               str(ROOT / "benchmarks" / "dp_stage.py")])
    out = []
    for stage, argv, k in _commands(tok_out, d2_out):
        if dp and stage.startswith("train_") and stage != "train_feature_net":
            argv = dp + argv[1:]                                     # drop "-m": the launcher takes the module
        out.append((stage, [params_file(train_workers) if a == "params.yaml" else a for a in argv], k))
    return out


def params_file(train_workers: int) -> str:
    return "params.yaml" if train_workers == 1 else f"params_w{train_workers}.yaml"


def _commands(tok_out: str, d2_out: str) -> list[tuple[str, list[str], int]]:
    return [
        ("prepare", ["-m", "pipeline.prepare", "--params", "params.yaml", "--out", "data/prepared"], 0),
        ("train_tokenizer", ["-m", "pipeline.train_tokenizer", "--params", "params.yaml", "--data",
                                  "data/prepared", "--out", tok_out, "--metrics", "metrics/tokenizer.json",
                                  "--plots", "plots/tokenizer", "--ckpt-dir", ".cache/train_tokenizer"], 0),
        ("extract_latents", ["-m", "pipeline.extract_latents", "--params", "params.yaml", "--prepared",
                             "data/prepared", "--tokenizer", "models/tokenizer", "--out", "data/latents"], 0),
        ("train_transformer", ["-m", "pipeline.train_transformer", "--depth", "2", "--params", "params.yaml",
                                    "--latents", "data/latents", "--tokenizer", "models/tokenizer", "--out",
                                    d2_out, "--metrics", "metrics/train/d2.json", "--plots", "plots/train/d2"], 0),
        ("train_feature_net", ["-m", "pipeline.train_feature_net", "--params", "params.yaml", "--prepared",
                               "data/prepared"], 0),
        ("reference_stats", ["-m", "pipeline.reference_stats", "--params", "params.yaml", "--prepared",
                             "data/prepared"], 0),
        ("sample", ["-m", "pipeline.sample", "--params", "params.yaml", "--depth", "2", "--schedule", "short",
                    "--model", "models/d2", "--out", "samples/d2/short"], 0),
        ("evaluate", ["-m", "pipeline.evaluate", "--params", "params.yaml", "--depth", "2", "--schedule", "short"], 0),
    ]


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss and Pss_Anon of a process in bytes (/proc/<pid>/smaps_rollup). PSS splits pages shared
    between processes (forked workers, the page cache of memory-mapped files) among them, so summing
    PSS over a process tree counts every page once; Pss_Anon leaves out file-backed pages."""
    out = {"Rss": 0, "Pss": 0, "Pss_Anon": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


class TreeMonitor(threading.Thread):
    """Polls a process and all its descendants: peak summed PSS (each page once), peak summed
    Pss_Anon (private memory: no mapped files / page cache), peak RSS of the largest single process,
    and per-process peaks."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every, self.stop = psutil.Process(pid), every, threading.Event()
        self.peak_pss = self.peak_anon = self.peak_one = 0
        self.per_proc: dict[int, dict] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            pss = anon = 0
            for p in procs:
                try:
                    name = " ".join(p.cmdline()[:4])[:80]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                m = smaps(p.pid)
                pss, anon = pss + m["Pss"], anon + m["Pss_Anon"]
                self.peak_one = max(self.peak_one, m["Rss"])
                rec = self.per_proc.setdefault(p.pid, {"cmd": name, "rss": 0, "pss": 0})
                rec["rss"], rec["pss"] = max(rec["rss"], m["Rss"]), max(rec["pss"], m["Pss"])
            self.peak_pss, self.peak_anon = max(self.peak_pss, pss), max(self.peak_anon, anon)
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
               or "_call_on_worker" in r["cmd"] or "dp_stage.py" in r["cmd"]]
    return {"seconds": round(seconds, 1), "peak_tree_pss_mb": round(mon.peak_pss / 2**20, 1),
            "peak_tree_private_mb": round(mon.peak_anon / 2**20, 1),
            "peak_process_rss_mb": round(mon.peak_one / 2**20, 1), "processes": len(mon.per_proc),
            "ray_workers": sorted(({"cmd": r["cmd"], "peak_rss_mb": round(r["rss"] / 2**20, 1),
                                    "peak_pss_mb": round(r["pss"] / 2**20, 1)} for r in workers),
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


def token_agreement(work: Path, max_images: int = 2000) -> dict:
    """Would float16 latent storage change the tokens? Quantise the float32 cache and its float16
    round trip at every scale 1..n (image and flip) and count identical token ids."""
    import torch

    from flexvar.data.latent_cache import load_latents
    from flexvar.tokenizer.vqvae import load_tokenizer

    vq = load_tokenizer(work / "models" / "tokenizer")
    data = load_latents(work / "data" / "latents", "train", in_memory_mb=0)
    m = min(max_images, len(data))
    full = max(data.latent_hw)
    same = total = 0
    per_scale = {}
    with torch.no_grad():
        for flip in (0, 1):
            z32 = data.latents_N2CHW[torch.arange(m), torch.full((m,), flip)]
            z16 = z32.half().float()
            for s in range(1, full + 1):
                a, _ = vq.quantize_at(z32, (s, s))
                b, _ = vq.quantize_at(z16, (s, s))
                eq = int((a == b).sum())
                same, total = same + eq, total + a.numel()
                per_scale[s] = per_scale.get(s, 0) + eq / a.numel() / 2
    return {"images": m, "tokens": total, "agreement": same / total, "mismatches": total - same,
            "per_scale": {k: round(v, 6) for k, v in per_scale.items()},
            "max_abs_error": float((z32 - z16).abs().max())}


def run_size(n: int, args) -> dict:
    work = Path(args.root) / f"n{n}"     # one folder per N: a multi-worker run reuses its data
    work.mkdir(parents=True, exist_ok=True)
    if args.train_workers > 1:
        args.stages = args.stages or ["train_tokenizer", "train_transformer"]
    (work / params_file(args.train_workers)).write_text(yaml.safe_dump(params_for(n, args)))
    trace = work / "data_trace"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEXVAR_PIPELINE_RUN_ID": f"scale-{n}",
           "FLEXVAR_DATA_TRACE": str(trace), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "RAY_USAGE_STATS_ENABLED": "0"}
    results = {}
    done_file = work / f"results_w{args.train_workers}.json"
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
        print(f"N={n} workers={args.train_workers} {stage}: {r['seconds']}s, peak tree PSS {r['peak_tree_pss_mb']} MB, "
              f"private {r['peak_tree_private_mb']} MB, largest process RSS {r['peak_process_rss_mb']} MB, "
              f"{r['items_per_s']} items/s", flush=True)
        for w in r["ray_workers"]:
            print(f"  worker {w}", flush=True)
        if stage == "train_tokenizer":
            r["rank_items"] = disjoint_epochs(trace, n, 16, args.steps)
            print(f"  items read per rank and epoch: {r['rank_items']}", flush=True)
        if stage == "extract_latents":
            r["fp16_token_agreement"] = token_agreement(work)
            print(f"  float16 storage vs float32: {r['fp16_token_agreement']}", flush=True)
        on_disk = json.loads(done_file.read_text()) if done_file.exists() else {}   # other runs on this folder
        results = {**on_disk, **results}
        done_file.write_text(json.dumps(results, indent=1))
    return results


MB = 2 ** 20
D16 = dict(n=1_281_167, px=256, latent=16, cvae=32, workers=8, data_workers=8, tok_batch=128, tr_batch=768,
           extract_batch=64, sample_batch=250, png_kb=120, jpeg_kb=110, fid_samples=50_000, inception_dim=2048)


def project_d16(measured: dict[str, dict]) -> list[tuple[str, float, str]]:
    """Host memory per process of the d16 preset on ImageNet-1k: the measured N-independent part of
    each stage (its private memory at the largest N measured here: interpreter, torch, datasets,
    MLflow, model) plus the data-path terms at 256 px, which are all O(batch). Returns
    (stage, MB, what the data term is). GPU-resident weights / optimizer state are not host memory."""
    p = D16
    img = 3 * p["px"] ** 2
    lat_item = 2 * p["cvae"] * p["latent"] ** 2 * 4
    terms = {
        "prepare": ((1000 * p["png_kb"] * 1024 + p["data_workers"] * 16 * 4 * (p["jpeg_kb"] + p["png_kb"]) * 1024
                     + p["data_workers"] * 4 * 500 * 400 * 3),
                    "Arrow writer batch (1000 PNGs) + task window (workers x 64 tasks: JPEG in, PNG out) "
                    "+ one decoded source image per worker"),
        "train_tokenizer": (2 * p["data_workers"] * (p["tok_batch"] // p["workers"]) * img * 5,
                            "2 prefetched batches per data worker, uint8 + float copies, per training worker"),
        "extract_latents": (2 * p["data_workers"] * p["extract_batch"] * img + p["extract_batch"] * (2 * img * 4 + lat_item),
                            "prefetched image batches + one float batch and its latents"),
        "train_transformer": ((p["tr_batch"] // p["workers"]) * lat_item * 4,
                              "the worker's share of a batch gathered from the memory-mapped cache (float32, x4 "
                              "for inputs/targets); the cache itself lives in the shared page cache"),
        "train_feature_net": (2 * p["data_workers"] * 64 * img * 5, "prefetched batches of 64"),
        "reference_stats": (64 * img * 5 + 50_000 * p["inception_dim"] * 8,
                            "torch-fidelity batch + the reference features (ImageNet val 50k x 2048 float64)"),
        "sample": (p["sample_batch"] * img * (1 + 4 * 2), "one batch: uint8 + float images (CFG doubles the batch)"),
        "evaluate": (64 * img * 5 + p["fid_samples"] * p["inception_dim"] * 8,
                     "torch-fidelity batch + 50k x 2048 float64 features (inherent to KID / precision-recall)"),
    }
    rows = []
    for stage, (data_bytes, what) in terms.items():
        base = measured.get(stage, {}).get("peak_tree_private_mb")
        if base is None:
            continue
        rows.append((stage, round(base + data_bytes / MB, 0), f"{base} MB measured + {data_bytes / MB:.0f} MB: {what}"))
    return rows


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
    ap.add_argument("--dp", choices=["ray", "torchrun"], default="ray",
                    help="launcher of multi-worker training: flows.ray_train (Ray Train) or torchrun + dp_stage.py")
    ap.add_argument("--tokenizer-ch", type=int, default=8, help="tokenizer.ch (small: a fast extract_latents)")
    ap.add_argument("--stages", nargs="*", default=None, help="only these stages (results are kept per folder)")
    args = ap.parse_args()
    global DP_LAUNCHER
    DP_LAUNCHER = args.dp
    allres = {n: run_size(n, args) for n in args.sizes}
    out = Path(args.root) / f"scale_memory_w{args.train_workers}.json"
    out.write_text(json.dumps({str(k): v for k, v in allres.items()}, indent=1))
    stages = [s for s, _, _ in stage_commands(args.train_workers)]
    print("\n| stage | " + " | ".join(f"N={n} tree PSS MB | private MB | largest RSS MB | items/s" for n in args.sizes)
          + " | PSS ratio | largest-RSS ratio |")
    print("|---" * (3 + 4 * len(args.sizes)) + "|")
    for s in stages:
        rows = [allres[n].get(s) for n in args.sizes]
        if not all(rows):
            continue
        cells = " | ".join(f"{r['peak_tree_pss_mb']} | {r['peak_tree_private_mb']} | {r['peak_process_rss_mb']} | "
                           f"{r['items_per_s']}" for r in rows)
        ratio = rows[-1]["peak_tree_pss_mb"] / rows[0]["peak_tree_pss_mb"]
        ratio1 = rows[-1]["peak_process_rss_mb"] / rows[0]["peak_process_rss_mb"]
        print(f"| {s} | {cells} | {ratio:.2f} | {ratio1:.2f} |")
    print("\nProjected host memory per training process, d16 on ImageNet-1k (8 workers / node):")
    print(f"  disk: prepared Arrow ~{D16['n'] * D16['png_kb'] / 2**20:.0f} GB PNG; latent cache "
          f"{D16['n'] * 2 * D16['cvae'] * D16['latent'] ** 2 * 4 / 2**30:.1f} GiB float32 "
          f"({D16['n'] * 2 * D16['cvae'] * D16['latent'] ** 2 * 2 / 2**30:.1f} GiB float16), memory-mapped: page "
          f"cache shared by all workers of a node, never copied per worker")
    for stage, mb, why in project_d16(allres[args.sizes[-1]]):
        print(f"  {stage}: ~{mb:.0f} MB  ({why})")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
