"""Multi-worker training through Ray Train: 2 workers follow the 1-worker loss trajectory.

Both runs use the same global batch (8), fp32, no class dropout / drop-path (those draw per-worker
random numbers, the one legitimate difference). Tolerance: |loss_2w - loss_1w| <= 1e-3 at every
step (float summation order differs: two half-batch means averaged vs one full-batch mean).
The second test runs the real train_transformer stage on 2 workers: rank 0 writes the outputs,
rank 1 only scratch copies, and the weights equal a 1-worker run's within tolerance.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.flows_support import ROOT, local_ray, stage_workdir

pytestmark = pytest.mark.slow   # real Ray Train workers

TOL = 1e-3
STEPS = 12


def tiny_training(out_dir: str, steps: int = STEPS) -> list[dict]:
    """A tiny FlexVAR on structured random latents (4 classes, 8x8) with the library loop; history on rank 0."""
    from flexvar.config import ScheduleConfig, TrainTransformerConfig, TransformerConfig
    from flexvar.distributed import rank_world
    from flexvar.data.latent_cache import LatentSplit
    from flexvar.tokenizer.quantizer import MultiScaleQuantizer
    from flexvar.seeding import seed_everything
    from flexvar.transformer.model import FlexVAR
    from flexvar.transformer.training import train_transformer

    torch.set_num_threads(1)
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 8, 2, 2, generator=g)

    def split(n: int) -> LatentSplit:
        labels = torch.randint(0, 4, (n,), generator=g)
        z = torch.nn.functional.interpolate(protos[labels], size=(8, 8), mode="bilinear")
        z = z + 0.3 * torch.randn(z.shape, generator=g)
        return LatentSplit(torch.stack([z, z.flip(-1)], 1), labels, ["a", "b", "c", "d"])

    train, val = split(64), split(16)
    quantizer = MultiScaleQuantizer(64, 8)
    tcfg = TransformerConfig(depth=1, width=32, heads=2, drop_path_rate=0.0, class_dropout=0.0)
    model = FlexVAR(tcfg, 64, 8, 4, pe_size=8)
    cfg = TrainTransformerConfig(steps=steps, batch_size=8, warmup_steps=2, log_every=1, eval_every=steps,
                                 checkpoint_every=steps, val_batches=1, precision="fp32")
    rank, _ = rank_world()
    result = train_transformer(model, quantizer, train, val, cfg, ScheduleConfig(), prediction="gt", seed=0,
                               device=torch.device("cpu"), out_dir=Path(out_dir) / f"rank{rank}")
    if rank == 0:
        (Path(out_dir) / "history.json").write_text(json.dumps({"history": result.history,
                                                                "val_loss": result.metrics["val_loss"]}))
    return result.history


@pytest.fixture(scope="module")
def ray_up():
    local_ray(2)
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers do not import tests/


def test_two_workers_follow_one_worker(ray_up, tmp_path):
    from flexvar.config import StageResources
    from flows.ray_train import run_on_workers

    one = tiny_training(str(tmp_path / "one"))
    run_on_workers(tiny_training, {"out_dir": str(tmp_path / "two")}, workers=2,
                   res=StageResources(num_cpus=1), storage=tmp_path / "ray_train", name="two")
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [h["step"] for h in two["history"]] == list(range(1, STEPS + 1)) == [h["step"] for h in one]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two["history"])]
    assert max(diffs) <= TOL, diffs
    assert one[-1]["loss"] < one[0]["loss"]          # it did learn
    print(f"max |loss_2w - loss_1w| over {STEPS} steps = {max(diffs):.2e}")


def stage_argv(out: str) -> list[str]:
    return ["--depth", "1", "--params", "params.yaml", "--latents", "lat", "--tokenizer", "tok",
            "--out", f"{out}/model", "--metrics", f"{out}/m.json", "--plots", f"{out}/plots"]


def test_stage_on_two_workers(ray_up, tmp_path):
    """The train_transformer stage itself on 2 workers, stopped after 4 of 8 steps and resumed: outputs and
    tracking from rank 0 only, and the same train/val loss as an uninterrupted 1-worker run."""
    from flexvar.config import load_params
    from flows.ray_train import SCRATCH, run_stage_distributed

    work = stage_workdir(tmp_path)
    params = load_params(work / "params.yaml")
    run_stage_distributed("pipeline.train_transformer", stage_argv("two") + ["--stop-after", "4"], work, params)
    assert torch.load(work / "two" / "model" / "resume.pt", weights_only=True)["step"] == 4   # interrupted
    run_stage_distributed("pipeline.train_transformer", stage_argv("two"), work, params)   # resumes at 4
    assert (work / "two" / "model" / "flexvar.pt").is_file()
    assert (work / SCRATCH / "rank1" / "out").is_dir()          # rank 1 wrote only scratch copies
    with sqlite3.connect(work / "mlflow.db") as db:             # rank 0 alone tracked: one run per invocation
        assert db.execute("select count(*) from tags where key = 'stage'").fetchone()[0] == 2
    one_run = subprocess.run([sys.executable, "-m", "pipeline.train_transformer", *stage_argv("one")], cwd=work,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=300)
    assert one_run.returncode == 0, one_run.stderr
    one, two = (json.loads((work / r / "m.json").read_text()) for r in ("one", "two"))
    assert abs(one["train_loss"] - two["train_loss"]) <= TOL and abs(one["val_loss"] - two["val_loss"]) <= TOL
