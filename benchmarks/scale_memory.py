"""Peak memory and throughput of every stage at two dataset sizes: is memory independent of N?

    python -m benchmarks.scale_memory --sizes 10000 100000 --root /tmp/scale [--train-workers 2]

For each N: a fresh work folder with params.yaml (builtin:shapes at 64 px, N train images, the
streaming path forced with data.in_memory_mb: 0, a few steps per training stage), then the real
stage commands one after another: prepare, train_tokenizer, extract_latents, train_transformer,
train_feature_net, reference_stats, sample (1,000 images), evaluate. Each stage is a subprocess
whose whole process tree (DataLoader / prepare workers, Ray workers) is polled every 0.2 s
(/proc/<pid>/smaps_rollup); reported per stage: peak PSS of the tree (shared pages counted once),
peak private memory of the tree (Pss_Anon: without mapped files / page cache), peak RSS of its
largest process, wall time and throughput. Figures are printed as a
table and written to <root>/scale_memory.json.

--train-workers 2 runs train_tokenizer and train_transformer through flows.ray_train (Ray Train,
2 workers) and reports each worker's peak RSS, and checks on the training sampler itself that the
ranks take disjoint items covering the split in every epoch.
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
    workers the training stages run under flows.ray_train and write models/tokenizer_dp and
    models/d2_dp, so the 1-worker run's outputs stay valid."""
    if train_workers == 1:
        dp, tok_out, d2_out = [], "models/tokenizer", "models/d2"
    else:
        tok_out, d2_out = "models/tokenizer_dp", "models/d2_dp"
        dp = ["-m", "flows.ray_train", sys.executable, "-m"]
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
    """Rss, Pss, Pss_Anon and Private_Dirty of a process in bytes (/proc/<pid>/smaps_rollup). PSS splits
    pages shared between processes (forked workers, the page cache of memory-mapped files) among them,
    so summing PSS over a process tree counts every page once; Pss_Anon leaves out file-backed pages;
    Private_Dirty is what only this process holds (a forked DataLoader worker's own allocations and
    copied-on-write pages: what one more such worker adds)."""
    out = {"Rss": 0, "Pss": 0, "Pss_Anon": 0, "Private_Dirty": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


TRAIN_WORKER_MARKS = ("RayTrainWorker",)   # a Ray Train worker running a stage


class TreeMonitor(threading.Thread):
    """Polls a process and all its descendants: peak summed PSS (each page once), peak summed
    Pss_Anon (private memory: no mapped files / page cache), peak RSS of the largest single process,
    per-process peaks, CPU seconds, and for every training worker (a process whose title names
    TRAIN_WORKER_MARKS; Ray renames its worker processes, so every title seen is kept) the peaks of
    the worker alone and of the worker with its DataLoader processes (its direct children)."""

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
            now = {}
            for p in procs:
                try:
                    name, ppid, cpu = " ".join(p.cmdline()[:4])[:80], p.ppid(), p.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                m = now[p.pid] = {**smaps(p.pid), "ppid": ppid}
                rec = self.per_proc.setdefault(p.pid, {"names": [], "rss": 0, "pss": 0, "anon": 0, "own": 0,
                                                       "cpu_s": 0.0, "tree_pss": 0, "tree_anon": 0})
                if name not in rec["names"]:
                    rec["names"].append(name)
                rec["ppid"], rec["cpu_s"] = ppid, max(rec["cpu_s"], cpu.user + cpu.system)
                rec["rss"], rec["pss"] = max(rec["rss"], m["Rss"]), max(rec["pss"], m["Pss"])
                rec["anon"], rec["own"] = max(rec["anon"], m["Pss_Anon"]), max(rec["own"], m["Private_Dirty"])
            for pid, m in now.items():   # a training worker plus its DataLoader processes
                if self.is_worker(pid):
                    kids = [c for c in now.values() if c["ppid"] == pid]
                    rec = self.per_proc[pid]
                    rec["tree_pss"] = max(rec["tree_pss"], m["Pss"] + sum(c["Pss"] for c in kids))
                    rec["tree_anon"] = max(rec["tree_anon"], m["Pss_Anon"] + sum(c["Pss_Anon"] for c in kids))
            self.peak_pss = max(self.peak_pss, sum(m["Pss"] for m in now.values()))
            self.peak_anon = max(self.peak_anon, sum(m["Pss_Anon"] for m in now.values()))
            self.peak_one = max([self.peak_one] + [m["Rss"] for m in now.values()])
            time.sleep(self.every)

    def is_worker(self, pid: int) -> bool:
        """A training worker, not one of its forked DataLoader processes (which inherit its title)."""
        def marked(q: int) -> bool:
            return q in self.per_proc and any(k in n for n in self.per_proc[q]["names"] for k in TRAIN_WORKER_MARKS)
        return marked(pid) and not marked(self.per_proc[pid].get("ppid", -1))

    def processes(self, workers_only: bool = False, min_rss_mb: float = 50) -> list[dict]:
        """Per-process peaks (processes above `min_rss_mb`, or the training workers with their loaders)."""
        mb = lambda b: round(b / 2**20, 1)   # noqa: E731
        rows = []
        for pid, r in self.per_proc.items():
            if workers_only and not self.is_worker(pid) or r["rss"] < min_rss_mb * 2**20:
                continue
            row = {"pid": pid, "ppid": r.get("ppid"), "title": " | ".join(r["names"])[:120],
                   "peak_rss_mb": mb(r["rss"]), "peak_pss_mb": mb(r["pss"]), "peak_private_mb": mb(r["anon"]),
                   "peak_private_dirty_mb": mb(r["own"]), "cpu_s": round(r["cpu_s"], 1)}
            if workers_only:
                row.update(peak_with_loaders_pss_mb=mb(r["tree_pss"]), peak_with_loaders_private_mb=mb(r["tree_anon"]))
            rows.append(row)
        return sorted(rows, key=lambda r: r["pid"])


def run_stage(work: Path, argv: list[str], env: dict) -> dict:
    load0, t0 = os.getloadavg(), time.perf_counter()
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
    main = mon.per_proc.get(proc.pid, {})
    return {"seconds": round(seconds, 1), "cpu_s": round(sum(r["cpu_s"] for r in mon.per_proc.values()), 1),
            "load_avg_1m": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
            "peak_tree_pss_mb": round(mon.peak_pss / 2**20, 1),
            "peak_tree_private_mb": round(mon.peak_anon / 2**20, 1),
            "peak_process_rss_mb": round(mon.peak_one / 2**20, 1),
            "peak_main_rss_mb": round(main.get("rss", 0) / 2**20, 1), "processes": len(mon.per_proc),
            "train_workers": mon.processes(workers_only=True), "per_process": mon.processes(),
            "log_tail": out[-600:]}


def items_per_run(stage: str, n: int, args) -> int:
    return {"prepare": n + args.num_val, "train_tokenizer": args.steps * 16, "extract_latents": n + args.num_val,
            "train_transformer": args.steps * 32, "train_feature_net": args.steps * 64,
            "reference_stats": args.num_val, "sample": args.samples, "evaluate": args.samples}[stage]


def sampler_epochs(n: int, batch: int, seed: int, world: int, epochs: int = 2) -> dict:
    """The training sampler's split of the data over ranks, over whole epochs (the benchmark's few steps
    stay inside epoch 0): each rank's StepBatchSampler for `epochs` epochs of n items; per epoch, items per rank, overlap, and coverage."""
    from flexvar.data.sampling import StepBatchSampler

    per_epoch = n // batch
    ranks = [list(StepBatchSampler(n, batch, seed, steps=epochs * per_epoch, rank=r, world=world))
             for r in range(world)]
    out = {}
    for e in range(epochs):
        sets = [set(i for part in parts[e * per_epoch:(e + 1) * per_epoch] for i in part) for parts in ranks]
        out[e] = {"items_per_rank": [len(s) for s in sets], "overlap": len(set.intersection(*sets)),
                  "covered": len(set.union(*sets))}
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEXVAR_PIPELINE_RUN_ID": f"scale-{n}",
           "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "RAY_USAGE_STATS_ENABLED": "0"}
    results = {}
    done_file = work / f"results_w{args.train_workers}.json"
    if done_file.exists():
        results = json.loads(done_file.read_text())
    for stage, argv, _ in stage_commands(args.train_workers):
        if stage in results or (args.stages and stage not in args.stages):
            continue
        r = run_stage(work, argv, env)
        r["items"] = items_per_run(stage, n, args)
        r["items_per_s"] = round(r["items"] / r["seconds"], 2)
        results[stage] = r
        print(f"N={n} workers={args.train_workers} {stage}: {r['seconds']}s ({r['cpu_s']} CPU s, load "
              f"{r['load_avg_1m']}), peak tree PSS {r['peak_tree_pss_mb']} MB, "
              f"private {r['peak_tree_private_mb']} MB, largest process RSS {r['peak_process_rss_mb']} MB, "
              f"{r['items_per_s']} items/s", flush=True)
        for w in r["train_workers"]:
            print(f"  worker {w}", flush=True)
        if stage == "train_tokenizer" and args.train_workers > 1:
            r["sampler_epochs"] = sampler_epochs(n, 16, params_for(n, args)["seed"], args.train_workers)
            print(f"  sampler over 2 whole epochs: {r['sampler_epochs']}", flush=True)
        if stage == "extract_latents":
            r["fp16_token_agreement"] = token_agreement(work)
            print(f"  float16 storage vs float32: {r['fp16_token_agreement']}", flush=True)
        on_disk = json.loads(done_file.read_text()) if done_file.exists() else {}   # other runs on this folder
        results = {**on_disk, **results}
        done_file.write_text(json.dumps(results, indent=1))
    return results


def print_tables(allres: dict[int, dict], stages: list[str], sizes: list[int]) -> None:
    """Markdown: memory per stage at each N with the largest-N / smallest-N ratios; time and load;
    training workers (multi-worker runs)."""
    lo, hi = sizes[0], sizes[-1]
    cols = [("peak_tree_pss_mb", "tree PSS"), ("peak_tree_private_mb", "tree private"),
            ("peak_process_rss_mb", "largest-process RSS")]
    print("\n| stage | " + " | ".join(f"N={n} {name} MB" for n in sizes for _, name in cols)
          + "".join(f" | {name} ratio" for _, name in cols) + " |")
    print("|---" * (1 + len(sizes) * len(cols) + len(cols)) + "|")
    for st in stages:
        rows = [allres[n].get(st) for n in sizes]
        if not all(rows):
            continue
        ratios = " | ".join(f"{rows[-1][k] / rows[0][k]:.2f}" for k, _ in cols)
        print(f"| {st} | " + " | ".join(str(r[k]) for r in rows for k, _ in cols) + f" | {ratios} |")
    print("\n| stage | " + " | ".join(f"N={n} wall s | CPU s | items/s | load 1 min (start, end)" for n in sizes) + " |")
    print("|---" * (1 + 4 * len(sizes)) + "|")
    for st in stages:
        rows = [allres[n].get(st) for n in sizes]
        if all(rows):
            print(f"| {st} | " + " | ".join(f"{r['seconds']} | {r.get('cpu_s', '')} | {r['items_per_s']} | "
                                            f"{r.get('load_avg_1m', '')}" for r in rows) + " |")
    workers = [(n, st, w) for n in sizes for st in stages for w in (allres[n].get(st) or {}).get("train_workers", [])]
    if workers:
        print("\n| N | stage | worker | peak RSS MB | PSS MB | private MB | with its DataLoader worker: PSS MB "
              "| private MB | CPU s |\n|---|---|---|---|---|---|---|---|---|")
        for n, st, w in workers:
            print(f"| {n} | {st} | pid {w['pid']} | {w['peak_rss_mb']} | {w['peak_pss_mb']} | {w['peak_private_mb']} "
                  f"| {w['peak_with_loaders_pss_mb']} | {w['peak_with_loaders_private_mb']} | {w['cpu_s']} |")
        if hi != lo:
            print(f"(ratios N={hi} / N={lo} per stage: worker peak RSS " + ", ".join(
                f"{st} {max(w['peak_rss_mb'] for w in allres[hi][st]['train_workers']) / max(w['peak_rss_mb'] for w in allres[lo][st]['train_workers']):.2f}"
                for st in stages if all((allres[n].get(st) or {}).get("train_workers") for n in (lo, hi))) + ")")


def loader_probe(prepared: Path, workers: int, batches: int = 40, batch: int = 64) -> dict:
    """What each DataLoader worker adds at `workers` workers (the d16 presets use 8): stream `batches`
    batches of a prepared split through a loader and record every worker's peak Private_Dirty and
    Pss_Anon, and this process's."""
    import torch

    from flexvar.data.sampling import RangeBatchSampler
    from flexvar.data.splits import load_split

    torch.set_num_threads(1)
    split = load_split(prepared, "train", in_memory_mb=0)
    peaks: dict[int, dict] = {}
    for k, _ in enumerate(split.loader(RangeBatchSampler(min(len(split), batches * batch), batch), workers)):
        for child in psutil.Process().children():
            m = smaps(child.pid)
            rec = peaks.setdefault(child.pid, {"private_dirty_mb": 0.0, "pss_anon_mb": 0.0})
            rec["private_dirty_mb"] = max(rec["private_dirty_mb"], round(m["Private_Dirty"] / 2**20, 1))
            rec["pss_anon_mb"] = max(rec["pss_anon_mb"], round(m["Pss_Anon"] / 2**20, 1))
    me = smaps(os.getpid())
    return {"workers": workers, "batches": batches, "batch": batch, "per_worker": list(peaks.values()),
            "main_pss_anon_mb": round(me["Pss_Anon"] / 2**20, 1)}


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
    ap.add_argument("--tokenizer-ch", type=int, default=8, help="tokenizer.ch (small: a fast extract_latents)")
    ap.add_argument("--stages", nargs="*", default=None, help="only these stages (results are kept per folder)")
    ap.add_argument("--loader-probe", type=int, default=0, metavar="WORKERS",
                    help="only measure what each of WORKERS DataLoader workers adds, on <root>/n<largest N>")
    args = ap.parse_args()
    if args.loader_probe:
        out = loader_probe(Path(args.root) / f"n{max(args.sizes)}" / "data" / "prepared", args.loader_probe)
        print(json.dumps(out, indent=1))
        (Path(args.root) / "loader_probe.json").write_text(json.dumps(out, indent=1))
        return
    allres = {n: run_size(n, args) for n in args.sizes}
    out = Path(args.root) / f"scale_memory_w{args.train_workers}.json"
    out.write_text(json.dumps({str(k): v for k, v in allres.items()}, indent=1))
    print_tables(allres, [s for s, _, _ in stage_commands(args.train_workers)], args.sizes)
    print(f"\nprojection to the d16 preset on ImageNet: python -m benchmarks.scaling_projection --memory-json "
          f"{Path(args.root) / 'scale_memory_w1.json'} --memory-dp-json {Path(args.root) / 'scale_memory_w2.json'}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
