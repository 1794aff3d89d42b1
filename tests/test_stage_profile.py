"""benchmarks/stage_profile.py counts each byte a stage writes once.

A process's /proc/<pid>/io includes what the children it has reaped wrote; summing every process of the
tree then counted a finished child twice (once as itself, once inside its parent): the rehearsal's
sample stage showed 42.7 GB written for the 21.8 GB its files take. Here a stage writes 64 MiB from a
child of `sh`, which reaps it and exits at once (so both vanish between two polls, as a stage command
and its shell do), under a shell that reaps `sh`; the profile must report 64 MiB, not 128.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.flows_support import ROOT

MIB = 2**20


def test_written_counts_a_reaped_childs_bytes_once(tmp_path):
    write = textwrap.dedent(f"""
        import os, time
        with open({str(tmp_path / 'blob')!r}, 'wb') as f:
            for _ in range(64):
                f.write(os.urandom({MIB}))
        time.sleep(1.5)   # seen by the poller before it exits
    """)
    (tmp_path / "write.py").write_text(write)
    script = (f"echo \"Running stage 'write'\"; sh -c '{sys.executable} write.py; true'; sleep 1.5; "
              f"echo \"Running stage 'idle'\"; sleep 1.5")
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.stage_profile", "--out", str(out), "--every", "0.2",
                          "--", "bash", "-c", script], cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    stages = json.loads(out.read_text())["stages"]
    written_mib = stages["write"]["written_gb"] * 1024
    assert 60 <= written_mib <= 70, stages
    assert stages["idle"]["written_gb"] * 1024 < 4, stages
