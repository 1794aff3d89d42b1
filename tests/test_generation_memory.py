"""The generation memory estimate is above the real peak, grows with scale and batch, and refuses
the runaway cases before allocating."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexvar.generation.generate import ScheduleError
from flexvar.generation.memory import GIB, check_generation_memory, generation_bytes
from tests.tiny_checkpoint import tiny_models

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import json, sys, torch
sys.path.insert(0, {root!r})
from flexvar.generation.generate import generate
from flexvar.generation.memory import generation_bytes
from tests.tiny_checkpoint import tiny_models
model, vq = tiny_models()
scales, batch = [(s, s) for s in {scales!r}], {batch}
labels = torch.zeros(batch, dtype=torch.int64)
def kib(field):   # a /proc/self/status field, bytes
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")   # reset the peak RSS (VmHWM) to the current RSS
before = kib("VmRSS")
generate(model, vq, labels, scales, batch_size=batch, cfg=1.5, train_side=8)
peak = kib("VmHWM") - before
print(json.dumps({{"peak": peak, "estimate": generation_bytes(model, vq, scales, batch, True, batch)}}))
"""


def test_estimate_is_above_the_measured_peak():
    """A real generation in a fresh process (tiny models, 20x20 final scale, batch 16): ~0.2 GB."""
    code = MEASURE.format(root=str(ROOT), scales=[1, 2, 4, 8, 16, 20], batch=16)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["peak"] > 50 * 2**20                       # the case is big enough to measure
    assert res["peak"] < res["estimate"] < 3 * res["peak"], res


def test_estimate_grows_with_scale_and_batch():
    model, vq = tiny_models()
    small = generation_bytes(model, vq, [(1, 1), (2, 2), (8, 8)], 8, True)
    assert generation_bytes(model, vq, [(1, 1), (2, 2), (16, 16)], 8, True) > 4 * small
    assert generation_bytes(model, vq, [(1, 1), (2, 2), (8, 8)], 32, True) > 3 * small
    assert generation_bytes(model, vq, [(1, 1), (2, 2), (8, 8)], 8, False) < small


def test_runaway_schedule_is_refused_naming_the_setting():
    model, vq = tiny_models()
    scales = [(1, 1), (2, 2), (99, 99)]      # the 23 GB case of `flexvar generate --schedule 1,2,99`
    assert generation_bytes(model, vq, scales, 32, True) > 16 * GIB
    with pytest.raises(ScheduleError, match="--max-memory-gb"):
        check_generation_memory(model, vq, scales, 32, True, 16.0, what="--schedule", setting="--max-memory-gb")
    assert check_generation_memory(model, vq, [(1, 1), (2, 2), (8, 8)], 32, True, 16.0, what="--schedule",
                                   setting="--max-memory-gb") < GIB


def test_bytes_kept_for_the_whole_run_are_counted_and_named():
    model, vq = tiny_models()
    scales = [(1, 1), (2, 2), (8, 8)]
    need = check_generation_memory(model, vq, scales, 32, True, 1.0, what="sample", setting="sample.max_memory_gb")
    assert check_generation_memory(model, vq, scales, 32, True, 1.0, what="sample", setting="sample.max_memory_gb",
                                   held_bytes=2**20) > need + 2**20
    with pytest.raises(ScheduleError, match="kept for the whole run.*sample.max_memory_gb"):
        check_generation_memory(model, vq, scales, 32, True, 1.0, what="sample", setting="sample.max_memory_gb",
                                held_bytes=GIB)
