"""Per-stage wall time, process-tree peak memory and disk written of one pipeline run.

    python -m benchmarks.stage_profile --out reports/rehearsal_dvc.json -- dvc repro
    python -m benchmarks.stage_profile --out reports/rehearsal_flow.json -- python -m flows.pipeline

Runs the command, reads its output line by line (echoed, each line timestamped) and polls its whole
process tree every 0.5 s (/proc/<pid>/smaps_rollup, /proc/<pid>/io). A stage's window opens at
dvc's "Running stage 'X'" or the flow's "submitted X" and closes at the next dvc stage line / the
flow's "X: finished". Reported per stage: wall time of its window; peak summed PSS of the tree while
the window is open (every process: the stage, its DataLoader / torchrun workers, and under the flow
the Ray processes around it; PSS counts a shared page once) and of its Pss_Anon (the same without
file-backed pages: a memory-mapped file read through, like samples.npz in evaluate, is page cache
the kernel can drop, but counts in PSS); bytes its processes wrote (/proc/<pid>/io write_bytes,
polled; a process's count includes what the children it has reaped wrote, so when a child is gone
what was already counted for it is taken off its parent's next increase: each byte counts once, and
a child's last writes arrive through its parent) and the size of its outputs as recorded in dvc.lock.
Windows may overlap under the flow (matrix entries run together); then the peak is that of
everything running at once. The JSON is rewritten after every stage, and Ctrl-C (or SIGTERM) stops
the command's process group and still writes what was measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.scale_memory import smaps

STAGE_OPEN = [re.compile(r"Running stage '([^']+)'"), re.compile(r"submitted (\S+)")]
STAGE_CLOSE = re.compile(r"(\S+): finished and committed")


def written(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Profile:
    def __init__(self):
        self.open: dict[str, float] = {}        # stage -> start time
        self.stages: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.writes: dict[int, int] = {}         # pid -> last write_bytes seen
        self.parent: dict[int, int] = {}         # pid -> its parent's pid when last seen
        self.reaped: dict[int, int] = {}         # pid -> bytes already counted for its vanished children

    def start(self, name: str, t: float) -> None:
        with self.lock:
            self.open[name] = t
            self.stages[name] = {"start": t, "peak_pss_bytes": 0, "peak_anon_bytes": 0, "written_bytes": 0}

    def close(self, name: str, t: float) -> None:
        with self.lock:
            if name in self.open:
                self.stages[name]["wall_s"] = round(t - self.open.pop(name), 1)

    def sample(self, root: psutil.Process) -> None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        mem = [smaps(p.pid) for p in procs]
        pss, anon = sum(m["Pss"] for m in mem), sum(m["Pss_Anon"] for m in mem)
        with self.lock:
            live = {p.pid for p in procs}
            gone = {pid for pid in self.writes if pid not in live}    # exited: an ancestor's count now has it
            for pid in gone:      # what was counted for it (its bytes and its vanished children's) passes to
                heir = self.parent.get(pid)     # its nearest live ancestor (a command and its shell go together)
                while heir in gone:
                    heir = self.parent.get(heir)
                self.reaped[heir] = self.reaped.get(heir, 0) + self.writes.pop(pid) + self.reaped.pop(pid, 0)
            for pid in gone:
                self.parent.pop(pid, None)
            for p in procs:
                w = written(p.pid)
                dw = w - self.writes.get(p.pid, 0)
                known = min(self.reaped.get(p.pid, 0), max(dw, 0))
                self.reaped[p.pid] = self.reaped.get(p.pid, 0) - known
                dw -= known
                self.writes[p.pid] = w
                with contextlib.suppress(psutil.Error):
                    self.parent[p.pid] = p.ppid()
                if dw > 0 and self.open:
                    for name in self.open:                 # shared among the stages open at once
                        self.stages[name]["written_bytes"] += dw // len(self.open)
            for name in self.open:
                self.stages[name]["peak_pss_bytes"] = max(self.stages[name]["peak_pss_bytes"], pss)
                self.stages[name]["peak_anon_bytes"] = max(self.stages[name]["peak_anon_bytes"], anon)


def lock_out_sizes(lock_path: Path) -> dict[str, int]:
    """stage -> summed size of its outs as dvc.lock records them."""
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text()).get("stages", {})
    return {name: sum(int(o.get("size", 0)) for o in st.get("outs", [])) for name, st in lock.items()}


def report(prof: Profile, cmd: list[str], rc: int | None, t0: float, out: Path) -> dict:
    sizes = lock_out_sizes(Path("dvc.lock"))
    with prof.lock:
        rows = {name: {"wall_s": s.get("wall_s"), "peak_pss_gb": round(s["peak_pss_bytes"] / 2**30, 2),
                       "peak_anon_gb": round(s["peak_anon_bytes"] / 2**30, 2),
                       "written_gb": round(s["written_bytes"] / 2**30, 3),
                       "outs_gb": round(sizes.get(name, 0) / 2**30, 3)} for name, s in prof.stages.items()}
    result = {"command": " ".join(cmd), "rc": rc, "wall_s": round(time.time() - t0, 1), "stages": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stage_profile")
    ap.add_argument("--out", required=True, help="JSON file for the per-stage figures")
    ap.add_argument("--every", type=float, default=0.5, help="polling interval in seconds")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the pipeline command")
    args = ap.parse_args()
    cmd, out = (args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd), Path(args.out)
    prof, t0 = Profile(), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)      # its own process group: stopped as one on Ctrl-C
    root, done = psutil.Process(proc.pid), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    def poll():
        while not done.is_set():
            prof.sample(root)
            time.sleep(args.every)

    threading.Thread(target=poll, daemon=True).start()
    last_dvc = None
    try:
        for line in proc.stdout:
            t = time.time()
            sys.stdout.write(f"[{t - t0:7.1f}s] {line}")
            sys.stdout.flush()
            for pat in STAGE_OPEN:
                if m := pat.search(line):
                    if pat is STAGE_OPEN[0] and last_dvc:         # dvc runs one stage at a time
                        prof.close(last_dvc, t)
                        report(prof, cmd, None, t0, out)
                    prof.start(m.group(1), t)
                    last_dvc = m.group(1) if pat is STAGE_OPEN[0] else None
            if m := STAGE_CLOSE.search(line):
                prof.close(m.group(1), t)
                report(prof, cmd, None, t0, out)
        rc = proc.wait()
    except KeyboardInterrupt:
        print("stage_profile: interrupted; stopping the command and writing what was measured", flush=True)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    done.set()
    for name in list(prof.open):
        prof.close(name, time.time())
    result = report(prof, cmd, rc, t0, out)
    print(f"{'stage':40s} {'wall s':>8s} {'peak PSS GB':>12s} {'anon GB':>8s} {'written GB':>11s} {'outs GB':>8s}")
    for name, r in result["stages"].items():
        print(f"{name:40s} {r['wall_s'] or 0:8.1f} {r['peak_pss_gb']:12.2f} {r['peak_anon_gb']:8.2f} "
              f"{r['written_gb']:11.3f} {r['outs_gb']:8.3f}")
    print(f"total {result['wall_s']:.1f}s, rc {rc}; written to {out}")
    sys.exit(rc if rc is not None else 1)


if __name__ == "__main__":
    main()
