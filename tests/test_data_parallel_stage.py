"""`dvc repro` uses the whole node: a training stage with `resources.train_workers: 2` re-launches itself on 2
gloo processes through torchrun (pipeline/data_parallel.py), and the global batch means the same whatever
the split into workers x micro-batch x accumulation.

  * the train_transformer stage on 2 workers (micro-batch 4, no accumulation) ends with the weights of the
    1-worker run with micro-batch 4 and 2 accumulation steps (same global batch 8): a few AdamW steps,
    compared to 1e-6 (measured 1.5e-8); rank 0 alone evaluates and writes;
  * each worker draws its own dropout masks while the workers split one global data order
    (tests/dp_masks_worker.py, the library loop under the real torchrun);
  * evaluation in micro-batches gives the full-batch val loss, and the loop evaluates in micro-batches;
  * a global batch that does not divide is refused with one line naming the keys, exit 2;
  * the train_tokenizer stage likewise (2 workers = 1 worker x 2 accumulation steps, one writer), and the
    tokenizer's accumulation gives the one-pass losses and gradient norm;
  * `auto` workers = the GPUs visible: torch's under `dvc repro`, the Ray cluster's / num_gpus under the flow.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.flows_support import stage_workdir

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"steps": 4, "micro_batch": 4, "eval_every": 4, "checkpoint_every": 4}   # global batch 8 (stage_workdir)


def run_stage(work: Path, params: str, out: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "pipeline.train_transformer", "--depth", "1", "--params", params,
                           "--latents", "lat", "--tokenizer", "tok", "--out", f"{out}/model", "--metrics",
                           f"{out}/m.json", "--plots", f"{out}/plots"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)


def with_resources(work: Path, name: str, **resources) -> str:
    p = yaml.safe_load((work / "params.yaml").read_text())
    p["resources"].update(resources)
    (work / name).write_text(yaml.safe_dump(p))
    return name


def test_two_workers_equal_one_worker_with_accumulation(tmp_path):
    work = stage_workdir(tmp_path, {"train_transformer": TRAIN})
    two = run_stage(work, with_resources(work, "p2.yaml", train_workers=2), "two")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "data-parallel on 2 workers" in two.stdout
    assert "global batch 8 = 2 worker(s) x micro-batch 4 x 1 accumulation step(s)" in two.stdout
    assert two.stdout.count("train_transformer: d1 wrote") == 1        # rank 1 neither re-evaluated nor wrote
    one = run_stage(work, with_resources(work, "p1.yaml", train_workers=1), "one")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "global batch 8 = 1 worker(s) x micro-batch 4 x 2 accumulation step(s)" in one.stdout
    w1, w2 = (torch.load(work / r / "model" / "flexvar.pt", weights_only=True)["model"] for r in ("one", "two"))
    assert w1.keys() == w2.keys()
    diff = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    print(f"max |w_2workers - w_1worker_accum2| = {diff:.2e}")
    assert diff <= 1e-6
    m1, m2 = (json.loads((work / r / "m.json").read_text()) for r in ("one", "two"))
    assert m1["steps"] == m2["steps"] == 4 and abs(m1["val_loss"] - m2["val_loss"]) <= 1e-5


def test_workers_draw_their_own_dropout_masks_over_one_data_order(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "tests" / "dp_masks_worker.py")
    for out, cmd in ((tmp_path / "one", [script]),
                     (tmp_path / "two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script])):
        out.mkdir()
        r = subprocess.run([sys.executable, *cmd, str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())       # 2 steps x 2 micro-batches of 8
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))   # 2 steps x 8 each
    assert len(one) == 4 and len(r0) == len(r1) == 2
    for step in range(2):
        global_batch = one[2 * step]["labels"] + one[2 * step + 1]["labels"]
        assert r0[step]["labels"] == global_batch[0::2] and r1[step]["labels"] == global_batch[1::2]
        assert r0[step]["dropped"] != r1[step]["dropped"]                 # rank-distinct class dropout
        assert any(r0[step]["dropped"]) and not all(r0[step]["dropped"])
    assert r0[0]["dropped"] != r0[1]["dropped"]


def tiny_model_and_val(n: int):
    from flexvar.config import TransformerConfig
    from flexvar.data.latent_cache import LatentSplit
    from flexvar.tokenizer.quantizer import MultiScaleQuantizer
    from flexvar.transformer.model import FlexVAR

    torch.manual_seed(0)
    z = torch.randn(n, 8, 8, 8)
    data = LatentSplit(torch.stack([z, z.flip(-1)], 1), torch.arange(n) % 4, list("abcd"))
    model = FlexVAR(TransformerConfig(depth=1, width=32, heads=2), 64, 8, 4, pe_size=8)
    with torch.no_grad():   # away from the near-uniform init, so per-image losses differ
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, MultiScaleQuantizer(64, 8), data


def test_evaluation_in_micro_batches_equals_the_full_batch():
    from flexvar.transformer.training import evaluate

    model, quantizer, val = tiny_model_and_val(24)
    scales = [(1, 1), (2, 2), (4, 4), (8, 8)]
    full = evaluate(model, quantizer, val, scales, "gt", 10, 2, torch.device("cpu"), "fp32")   # 20 images
    for micro in (4, 3, 7):    # 20 = 5 x 4 = 6 x 3 + 2 = 2 x 7 + 6: uneven last chunks too
        part = evaluate(model, quantizer, val, scales, "gt", 10, 2, torch.device("cpu"), "fp32", micro)
        assert part.keys() == full.keys()
        assert max(abs(part[k] - full[k]) for k in full) <= 1e-6, micro


def test_training_loop_evaluates_in_micro_batches(tmp_path):
    from flexvar.config import ScheduleConfig, TrainTransformerConfig
    from flexvar.transformer.training import train_transformer

    model, quantizer, data = tiny_model_and_val(32)
    eval_batches: list[int] = []
    model.register_forward_pre_hook(lambda m, args: None if m.training else eval_batches.append(len(args[0])))
    cfg = TrainTransformerConfig(steps=1, batch_size=16, micro_batch=4, warmup_steps=0, eval_every=1, val_batches=2,
                                 precision="fp32")
    result = train_transformer(model, quantizer, data, data, cfg, ScheduleConfig(), prediction="gt", seed=0,
                               device=torch.device("cpu"), out_dir=tmp_path)
    assert eval_batches == [4] * 8 and "val_loss" in result.metrics     # 2 x 16 val images, 4 at a time


@pytest.mark.parametrize("batch, micro, names", [
    (8, 3, ["train_transformer.batch_size = 8", "resources.train_workers = 2", "train_transformer.micro_batch = 3"]),
    (7, "auto", ["train_transformer.batch_size = 7", "resources.train_workers = 2"]),
])
def test_global_batch_that_does_not_divide_is_refused_naming_the_keys(tmp_path, batch, micro, names):
    work = stage_workdir(tmp_path, {"train_transformer": {"batch_size": batch, "micro_batch": micro}})
    r = run_stage(work, "params.yaml", "out")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in names), r.stderr
    assert not (work / "out" / "model" / "flexvar.pt").exists() and "torch.distributed.run" not in r.stderr


def tokenizer_workdir(d: Path, prepared: Path, batch: int = 8) -> Path:
    p = {"data": {"resolution": 32}, "tokenizer": {"ch": 8, "ch_mult": [1, 2, 2], "z_channels": 8, "codebook_dim": 4,
                                                    "codebook_size": 32, "norm_min_group_channels": 4},
         "train_tokenizer": {"steps": 4, "batch_size": batch, "micro_batch": 4, "warmup_steps": 1, "num_scales": 2, "precision": "fp32",
                             "checkpoint_every": 2, "eval_every": 4, "log_every": 1, "val_images": 8},
         "resources": {"num_threads": 1, "train_workers": 2}, "variants": {"depths": [1]}}
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(p))
    (d / "prepared").symlink_to(prepared)
    return d


def run_tokenizer_stage(work: Path, params: str, out: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.train_tokenizer", "--params", params, "--data", "prepared",
                           "--out", f"{out}/tok", "--metrics", f"{out}/m.json", "--plots", f"{out}/plots",
                           "--ckpt-dir", f"{out}/ckpt"], cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_tokenizer_stage_on_two_workers_follows_one_worker(tmp_path, tiny_prepared):
    """train_tokenizer with train_workers 2 (micro-batch 4, no accumulation): torchrun, rank 0 alone logs and
    writes, and the global-batch loss of every step equals the 1-worker run's with micro-batch 4 and 2
    accumulation steps (4 AdamW steps; the weights then agree to ~4e-5, Adam's normalisation amplifying
    float summation order on near-zero gradients)."""
    import csv

    work = tokenizer_workdir(tmp_path / "w", tiny_prepared)
    two = run_tokenizer_stage(work, with_resources(work, "p2.yaml", train_workers=2), "two")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "data-parallel on 2 workers" in two.stdout and two.stdout.count("train_tokenizer: wrote") == 1
    assert two.stdout.count("step 4/4") == 1                                  # rank 1 logs nothing
    one = run_tokenizer_stage(work, with_resources(work, "p1.yaml", train_workers=1), "one")
    assert one.returncode == 0, one.stderr[-3000:]
    l1, l2 = ([float(r["loss"]) for r in csv.DictReader(open(work / o / "plots" / "loss.csv"))] for o in ("one", "two"))
    assert len(l1) == len(l2) == 4 and max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-5
    assert not (work / "two" / "ckpt" / "train_state.pt").exists()          # removed after success, by rank 0


def test_tokenizer_batch_that_does_not_divide_is_refused(tmp_path, tiny_prepared):
    work = tokenizer_workdir(tmp_path / "w", tiny_prepared, batch=6)
    r = run_tokenizer_stage(work, "params.yaml", "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert all(k in lines[0] for k in ("train_tokenizer.batch_size = 6", "resources.train_workers = 2",
                                       "train_tokenizer.micro_batch = 4"))


def test_auto_workers_are_the_gpus_visible(tmp_path):
    """`auto` resolves to the GPUs a launcher sees: torch's CUDA devices under `dvc repro` (none here: 1), and the
    Ray cluster's GPUs over the stage's num_gpus per worker under the flow (a local Ray declaring 4 GPUs)."""
    from flexvar.distributed import resolve_workers

    assert resolve_workers("auto") == (torch.cuda.device_count() if torch.cuda.is_available() else 1)
    assert resolve_workers(3) == 3
    code = """
import ray
from flexvar.config import load_params_dict
from flows.ray_train import train_workers
ray.init(num_cpus=1, num_gpus=4, include_dashboard=False)
res = lambda gpus: {"train_workers": "auto", "stages": {"train_transformer": {"num_gpus": gpus}}}
print(train_workers(load_params_dict({"resources": res(1)}), "train_transformer@16"),
      train_workers(load_params_dict({"resources": res(2)}), "train_transformer@16"),
      train_workers(load_params_dict({"resources": res(0)}), "train_transformer@16"),
      train_workers(load_params_dict({"resources": {"train_workers": 3}}), "train_transformer@16"))
ray.shutdown()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-4:] == ["4", "2", "1", "3"]


def test_tokenizer_accumulation_follows_one_pass():
    """TokenizerTrainer: global batch 8 as 2 micro-batches of 4 gives the losses of one pass of 8 (no GAN: every
    term is a per-image mean); with the GAN term the discriminator also steps over accumulated micro-batches."""
    from flexvar.config import TokenizerConfig, TrainTokenizerConfig
    from flexvar.tokenizer.training import TokenizerTrainer

    images = (torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    model_cfg = TokenizerConfig(ch=8, ch_mult=[1, 2], z_channels=8, codebook_dim=4, codebook_size=32)

    def run(micro, gan_weight=0.0):
        cfg = TrainTokenizerConfig(steps=4, batch_size=8, micro_batch=micro, warmup_steps=1, num_scales=2,
                                   precision="fp32", gan_weight=gan_weight, gan_start_step=1)
        t = TokenizerTrainer(model_cfg, cfg, 0, images, torch.device("cpu"))
        return t, [t.train_step() for _ in range(4)]

    (t8, one), (t4, acc) = run("auto"), run(4)
    assert (t8.accum, t4.accum) == (1, 2)
    for key in ("loss", "recon", "codebook", "commit", "grad_norm"):   # grad_norm: the summed gradient, before clipping
        assert max(abs(a[key] - b[key]) / max(abs(a[key]), 1e-3) for a, b in zip(one, acc)) <= 1e-5, key
    tg, logs = run(4, gan_weight=0.1)
    disc0 = TokenizerTrainer(model_cfg, tg.cfg, 0, images, torch.device("cpu")).disc.state_dict()
    assert all(map(math.isfinite, (r["d_loss"] for r in logs[1:]))) and "d_loss" not in logs[0]
    assert any(not torch.equal(v, disc0[k]) for k, v in tg.disc.state_dict().items() if "running" not in k)
