"""Kill-and-resume of the real `train_tokenizer` stage: SIGKILL a run after its first checkpoint,
re-run it, and require bit-identical final weights to an uninterrupted run (CPU, same seed)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flexvar.config import Params

pytestmark = pytest.mark.slow   # kill-and-resume of a stage process

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 4


def tiny_params() -> dict:
    p = Params().model_dump(mode="json")
    p["data"].update(resolution=32, num_train=48, num_val=8)
    p["tokenizer"].update(ch=16, ch_mult=[1, 2, 2], z_channels=32, codebook_dim=8, codebook_size=64)
    p["train_tokenizer"].update(steps=STEPS, batch_size=8, warmup_steps=3, checkpoint_every=EVERY, eval_every=12,
                                log_every=4, val_images=8, precision="bf16", ema_decay=0.9)
    p["resources"].update(device="cpu", num_threads=1)
    return p


def run_stage(workdir: Path, data: Path, wait: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.train_tokenizer", "--params", "params.yaml", "--data", str(data),
           "--out", "models/tokenizer", "--metrics", "metrics/tokenizer.json", "--plots", "plots/tokenizer",
           "--ckpt-dir", "ckpt"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEXVAR_PIPELINE_RUN_ID": "test-resume"}
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        proc.output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, proc.output
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", "params.yaml", "--out", "prepared"],
                   cwd=root, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    return root / "prepared"


def workdir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    return d


def test_killed_run_resumes_to_identical_weights(prepared, tmp_path):
    straight, killed = workdir(tmp_path, "straight"), workdir(tmp_path, "killed")
    reference = run_stage(straight, prepared, wait=False)   # runs alongside the victim
    victim = run_stage(killed, prepared, wait=False)
    ckpt = killed / "ckpt" / "train_state.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    out, _ = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{out}"
    step_at_kill = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step_at_kill < STEPS and not (killed / "models/tokenizer/tokenizer.pt").exists()

    resumed = run_stage(killed, prepared)
    assert f"resuming from ckpt/train_state.pt at step {step_at_kill}/{STEPS}" in resumed.output
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    a = torch.load(straight / "models/tokenizer/tokenizer.pt", weights_only=True)
    b = torch.load(killed / "models/tokenizer/tokenizer.pt", weights_only=True)
    assert a["config"] == b["config"] and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not ckpt.exists()                           # removed once the stage succeeded
    # the resumed run's loss curve has each step once, in order
    steps = [int(line.split(",")[0]) for line in (killed / "plots/tokenizer/loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(EVERY, STEPS + 1, EVERY))
    for f in ("metrics/tokenizer.json", "plots/tokenizer/val_psnr.csv", "plots/tokenizer/psnr_per_scale.csv",
              "plots/tokenizer/recon_scales.png"):
        assert (killed / f).is_file(), f
