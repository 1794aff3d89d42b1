"""Multi-worker training through Ray Train (PyTorch DDP / FSDP2 on gloo): 2 workers follow the 1-worker loss trajectory,
step on the 1-worker gradients (the mean over the global batch; compared per parameter, since AdamW's
update hardly changes when a gradient is scaled, e.g. summed over workers instead of averaged) and end on
identical weights on both ranks, equal to the 1-worker weights within float tolerance.

Both runs use the same global batch (8), fp32, no class dropout / drop-path (those draw per-worker
random numbers, the one legitimate difference). Tolerance: |loss_2w - loss_1w| <= 1e-3 at every
step (float summation order differs: two half-batch means averaged vs one full-batch mean).
Checked for `ddp` and for `fsdp` (with gradient accumulation, so no_sync micro-steps are covered),
for a 2-worker run killed mid-training (one worker SIGKILLed; Ray Train restarts the group, which
resumes from rank 0's consolidated checkpoint), and for the real train_transformer stage on 2
workers: rank 0 writes the outputs, rank 1 only scratch copies, and the losses equal a 1-worker run's.
A stage task killed while its 2 workers train leaves no placement group holding the CPUs behind.
"""
from __future__ import annotations

import json
import os
import signal
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
GRAD_STEPS = 2      # steps whose gradients are compared with the 1-worker run's
GRAD_RTOL = 1e-5    # per parameter, |g_2w - g_1w| / |g_1w|: float summation order (two half-batch means averaged)
WEIGHT_ATOL = 1e-4  # final weights after STEPS AdamW steps, 2 workers vs 1


def tiny_training(out_dir: str, steps: int = STEPS, parallelism: str = "ddp", grad_accum: int = 1,
                  checkpoint_every: int = STEPS, kill_rank_at: tuple[int, int] | None = None,
                  grad_clip: float = 1.0) -> list[dict]:
    """A tiny FlexVAR on structured random latents (4 classes, 8x8) with the library loop; history on rank 0.
    `kill_rank_at` (rank, step): that worker SIGKILLs itself after that step, once (a marker file remembers).
    Each rank saves (rank{r}.pt) its final weights and the full gradients its optimiser stepped on at the
    first GRAD_STEPS steps (read by a step pre-hook: after DDP's all-reduce / FSDP's reduce-scatter)."""
    from flexvar.config import ScheduleConfig, TrainTransformerConfig, TransformerConfig
    from flexvar.distributed import rank_world
    from flexvar.data.latent_cache import LatentSplit
    from flexvar.tokenizer.quantizer import MultiScaleQuantizer
    from flexvar.seeding import seed_everything
    from flexvar.transformer.model import FlexVAR
    from flexvar.transformer.training import train_transformer
    from torch.distributed.tensor import DTensor
    from torch.optim.optimizer import register_optimizer_step_pre_hook

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
    # global batch 8; micro-batch 4 // grad_accum: 2 workers accumulate grad_accum steps, 1 worker 2 x as many
    cfg = TrainTransformerConfig(steps=steps, batch_size=8, micro_batch=4 // grad_accum, lr=3e-4, warmup_steps=2,
                                 log_every=1, eval_every=steps, checkpoint_every=checkpoint_every, val_batches=1,
                                 precision="fp32", grad_clip=grad_clip)
    rank, _ = rank_world()
    marker = Path(out_dir) / "killed"
    resume_file = Path(out_dir) / "state" / "resume.pt"
    start = torch.load(resume_file, weights_only=True)["step"] if resume_file.exists() else 0
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / f"starts_rank{rank}", "a") as f:   # where each (re)start of this worker began
        f.write(f"{start}\n")

    def maybe_kill(step: int) -> None:
        if kill_rank_at == (rank, step) and not marker.exists():
            marker.write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)
    grads: list[list[torch.Tensor]] = []

    def stepped_grads(opt, args, kwargs) -> None:
        if len(grads) < GRAD_STEPS:
            full = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                    for group in opt.param_groups for p in group["params"]]
            grads.append([torch.zeros(()) if g is None else g.detach().clone() for g in full])
    hook = register_optimizer_step_pre_hook(stepped_grads)
    try:
        result = train_transformer(model, quantizer, train, val, cfg, ScheduleConfig(), prediction="gt", seed=0,
                                   device=torch.device("cpu"), out_dir=Path(out_dir) / "state", on_step=maybe_kill,
                                   parallelism=parallelism)
    finally:
        hook.remove()
    torch.save({"grads": grads, "weights": model.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    if rank == 0:
        (Path(out_dir) / "history.json").write_text(json.dumps({"history": result.history,
                                                                "val_loss": result.metrics["val_loss"]}))
    return result.history


@pytest.fixture(scope="module")
def ray_up():
    local_ray(2)
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers do not import tests/


def max_loss_diff(one: list[dict], two: list[dict], steps: int = STEPS) -> float:
    assert [h["step"] for h in two] == list(range(1, steps + 1)) == [h["step"] for h in one]
    return max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two))


@pytest.mark.slow
@pytest.mark.parametrize("parallelism, grad_accum", [("ddp", 1), ("fsdp", 2)])
def test_two_workers_follow_one_worker(ray_up, tmp_path, parallelism, grad_accum):
    from flexvar.config import StageResources
    from flows.ray_train import run_on_workers

    one = tiny_training(str(tmp_path / "one"), grad_accum=grad_accum, grad_clip=0.0)
    run_on_workers(tiny_training, {"out_dir": str(tmp_path / "two"), "parallelism": parallelism,
                                   "grad_accum": grad_accum, "grad_clip": 0.0},
                   workers=2, res=StageResources(num_cpus=1), storage=tmp_path / "ray_train", name="two")
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    diff = max_loss_diff(one, two["history"])
    assert diff <= TOL
    assert one[-1]["loss"] < one[0]["loss"]          # it did learn
    # the gradients each rank stepped on = the 1-worker gradient of the same global batch (the mean over it:
    # a sum over workers would be 2x, a rank's own half-batch gradient another vector), identical on both ranks
    ref, r0, r1 = (torch.load(tmp_path / d / f"rank{r}.pt", weights_only=True)
                   for d, r in (("one", 0), ("two", 0), ("two", 1)))
    assert len(ref["grads"]) == len(r0["grads"]) == len(r1["grads"]) == GRAD_STEPS
    worst = 0.0
    for step, (g_ref, g_0, g_1) in enumerate(zip(ref["grads"], r0["grads"], r1["grads"]), 1):
        assert len(g_ref) == len(g_0) == len(g_1)
        for i, (a, b, c) in enumerate(zip(g_ref, g_0, g_1)):
            assert torch.equal(b, c), (step, i, "ranks stepped on different gradients")
            rel = float((b - a).norm() / a.norm().clamp(min=1e-12))
            worst = max(worst, rel)
            assert rel <= GRAD_RTOL, (step, i, rel, float(b.norm() / a.norm().clamp(min=1e-12)))
    for k, w in ref["weights"].items():               # both ranks end on the same weights, the 1-worker ones
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
        assert (r0["weights"][k] - w).abs().max() <= WEIGHT_ATOL, (k, float((r0["weights"][k] - w).abs().max()))
    print(f"{parallelism}: worst relative gradient difference over {GRAD_STEPS} steps = {worst:.2e}")
    # the consolidated resume state written by 2 workers loads into a plain single-process model
    state = torch.load(tmp_path / "two" / "state" / "resume.pt", weights_only=True)
    from flexvar.config import TransformerConfig
    from flexvar.transformer.model import FlexVAR
    FlexVAR(TransformerConfig(depth=1, width=32, heads=2), 64, 8, 4, pe_size=8).load_state_dict(state["model"])
    print(f"{parallelism} grad_accum={grad_accum}: max |loss_2w - loss_1w| over {STEPS} steps = {diff:.2e}")


@pytest.mark.slow
def test_killed_two_worker_run_resumes(ray_up, tmp_path):
    """Rank 1 is SIGKILLed after step 7 (last checkpoint at 4): Ray Train restarts both workers, they resume
    from step 4 and finish on the 1-worker trajectory."""
    from flexvar.config import StageResources
    from flows.ray_train import run_on_workers

    one = tiny_training(str(tmp_path / "one"))
    run_on_workers(tiny_training, {"out_dir": str(tmp_path / "two"), "checkpoint_every": 4, "kill_rank_at": (1, 7)},
                   workers=2, res=StageResources(num_cpus=1), storage=tmp_path / "ray_train", name="killed",
                   max_failures=1)
    assert (tmp_path / "two" / "killed").read_text() == "7"          # the kill did happen
    for rank in (0, 1):                                               # both restarted from the step-4 checkpoint
        assert (tmp_path / "two" / f"starts_rank{rank}").read_text().split() == ["0", "4"]
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    diff = max_loss_diff(one, two["history"])
    assert diff <= TOL
    print(f"killed at 7, resumed at 4: max |loss_2w - loss_1w| over {STEPS} steps = {diff:.2e}")


def tiny_tokenizer_training(out_dir: str, gan_weight: float, steps: int = 6) -> list[float]:
    """A tiny VQVAE (GAN term from step 2 when gan_weight > 0); per-step loss on rank 0, final weights per rank."""
    from flexvar.config import TokenizerConfig, TrainTokenizerConfig
    from flexvar.distributed import rank_world
    from flexvar.tokenizer.training import TokenizerTrainer

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(16, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    model_cfg = TokenizerConfig(ch=8, ch_mult=[1, 2], z_channels=8, codebook_dim=4, codebook_size=32,
                                entropy_weight=0.0, norm_min_group_channels=1)
    cfg = TrainTokenizerConfig(steps=steps, batch_size=8, lr=3e-4, warmup_steps=1, num_scales=2,
                               gan_weight=gan_weight, gan_start_step=2, precision="fp32")
    trainer = TokenizerTrainer(model_cfg, cfg, 0, images, torch.device("cpu"))
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    rank = rank_world()[0]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"model": trainer.model.state_dict(), "disc": trainer.disc.state_dict() if trainer.disc else {}},
               Path(out_dir) / f"weights_rank{rank}.pt")
    if rank == 0:
        (Path(out_dir) / "losses.json").write_text(json.dumps(losses))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("gan_weight", [0.0, 0.1])
def test_tokenizer_two_workers_follow_one_worker(ray_up, tmp_path, gan_weight):
    """Tokenizer on 2 DDP workers: the 1-worker loss trajectory (without GAN; with it, up to the GAN start,
    after which the CPU discriminator's BatchNorm uses per-worker statistics) and identical replicas of
    generator and discriminator on both workers (their gradients were averaged by DDP)."""
    from flexvar.config import StageResources
    from flows.ray_train import run_on_workers

    one = tiny_tokenizer_training(str(tmp_path / "one"), gan_weight)
    run_on_workers(tiny_tokenizer_training, {"out_dir": str(tmp_path / "two"), "gan_weight": gan_weight},
                   workers=2, res=StageResources(num_cpus=1), storage=tmp_path / "ray_train", name="tok")
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    same_until = 6 if gan_weight == 0 else 2
    diff = max(abs(a - b) for a, b in zip(one[:same_until], two[:same_until]))
    assert len(two) == len(one) == 6 and diff <= TOL
    w0, w1 = (torch.load(tmp_path / "two" / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("model", "disc"):   # weights; not BatchNorm running statistics (per-worker on CPU)
        for k, v in w0[part].items():
            assert "running_" in k or "num_batches" in k or torch.equal(v, w1[part][k]), (part, k)
    assert len(w0["disc"]) == (0 if gan_weight == 0 else len(w1["disc"])) and (gan_weight == 0 or w0["disc"])
    print(f"tokenizer gan_weight={gan_weight}: max |loss_2w - loss_1w| over {same_until} steps = {diff:.2e}")


def stage_argv(out: str) -> list[str]:
    return ["--depth", "1", "--params", "params.yaml", "--latents", "lat", "--tokenizer", "tok",
            "--out", f"{out}/model", "--metrics", f"{out}/m.json", "--plots", f"{out}/plots"]


@pytest.mark.slow
def test_stage_on_two_workers(ray_up, tmp_path, capfd):
    """The train_transformer stage itself on 2 workers: outputs and tracking from rank 0 only, and the same
    train/val loss as a 1-worker run (a killed 2-worker run resuming: test_killed_two_worker_run_resumes;
    a killed stage: tests/test_transformer_resume.py). Its log reaches the driver once a line (Ray Train's
    print patch printed each twice) and without the PlacementGroupCleaner's warning that the State API is
    down, repeated every second when the embedded cluster ran no dashboard (flows/cluster.py)."""
    import time

    from flexvar.config import load_params
    from flows.ray_train import SCRATCH, run_stage_distributed

    work = stage_workdir(tmp_path)
    params = load_params(work / "params.yaml")
    capfd.readouterr()
    run_stage_distributed("pipeline.train_transformer", stage_argv("two"), work, params)
    time.sleep(3)    # Ray forwards worker output to the driver asynchronously
    log = "".join(capfd.readouterr())
    assert log.count("train_transformer: global batch 8 = 2 worker(s)") == 1, log[-3000:]
    assert "Failed to query Ray Train Controller" not in log, log[-3000:]
    assert (work / "two" / "model" / "flexvar.pt").is_file()
    assert (work / SCRATCH / "rank1" / "out").is_dir()          # rank 1 wrote only scratch copies
    with sqlite3.connect(work / "mlflow.db") as db:             # rank 0 alone tracked: one run per invocation
        assert db.execute("select count(*) from tags where key = 'stage'").fetchone()[0] == 1
    one_run = subprocess.run([sys.executable, "-m", "pipeline.train_transformer", *stage_argv("one")], cwd=work,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=300)
    assert one_run.returncode == 0, one_run.stderr
    one, two = (json.loads((work / r / "m.json").read_text()) for r in ("one", "two"))
    assert abs(one["train_loss"] - two["train_loss"]) <= TOL and abs(one["val_loss"] - two["val_loss"]) <= TOL


def sleep_on_worker(seconds: float, started: str) -> None:
    import time

    import ray.train

    (Path(started) / f"rank{ray.train.get_context().get_world_rank()}").touch()
    time.sleep(seconds)


def new_placement_groups(before: set) -> dict:
    import ray

    return {k: v["state"] for k, v in ray.util.placement_group_table().items() if k not in before}


@pytest.mark.slow
def test_killed_stage_task_frees_its_workers(ray_up, tmp_path):
    """A stage task killed mid-training (as Ray's memory monitor kills the largest task, then retries it) leaves
    the placement group of its Ray Train workers behind. Ray Train's placement-group cleaner removes it once the
    State API reports the controller dead; the embedded cluster starts the dashboard that serves that API
    (flows/cluster.py). Without it the group held both CPUs for good and the retried stage waited forever."""
    import time

    import ray

    from flexvar.config import StageResources
    from flows.ray_train import run_on_workers

    before, pid_file = set(ray.util.placement_group_table()), tmp_path / "stage_task.pid"

    @ray.remote(num_cpus=0, max_retries=0)
    def stage_task() -> None:
        pid_file.write_text(str(os.getpid()))
        run_on_workers(sleep_on_worker, {"seconds": 600, "started": str(tmp_path)}, 2, StageResources(num_cpus=1),
                       tmp_path / "ray", "killed")

    ref = stage_task.remote()
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("rank*"))) < 2 and time.monotonic() < deadline:   # both workers training
        time.sleep(1)
    created = [k for k, state in new_placement_groups(before).items() if state == "CREATED"]
    assert created and pid_file.is_file() and len(list(tmp_path.glob("rank*"))) == 2, "the 2 workers never started"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayError):
        ray.get(ref)
    deadline = time.monotonic() + 120
    while any(new_placement_groups(before)[k] != "REMOVED" for k in created) and time.monotonic() < deadline:
        time.sleep(1)
    assert all(new_placement_groups(before)[k] == "REMOVED" for k in created), new_placement_groups(before)
    deadline = time.monotonic() + 60     # the group's CPUs return as its workers exit and the raylet reports
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == 2, ray.available_resources()
