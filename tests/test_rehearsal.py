"""The rehearsal, CI-sized (issue 30): the d16 workload's shape end to end under a real `dvc repro` and
under the Prefect flow on a local Ray (`flows.pipeline`, the training stages as Ray Train workers).

In a temporary git repo: `python -m flexvar.data.rehearsal data/rehearsal` writes a small ImageNet-layout
JPEG folder (4 classes x (3 train + 1 val), mixed sizes, some with a short side under 256 px, 2 corrupt
files); `flexvar preset rehearsal` applies the real preset, and a second `flexvar preset <file>` shrinks only
the sizes, as a user would (few steps, a small global batch that still splits as 2 workers x micro-batch x
2 accumulation steps, 2 augmented views, 2 samples per class). What stays the rehearsal's: 256 px,
downsampling 16 (16x16 latent), 8912 codes, the official 10-step 680-token schedule, 2 data-parallel
gloo workers for both training stages, sample and evaluate.

Then what the rehearsal is meant to prove: every stage ran and `dvc status` is clean; prepare skipped and
counted the corrupt files and resized the small ones up; both training stages ran on 2 workers with the
accumulation the params imply; sample wrote per_class x classes images at 256 px on the 10-step schedule;
evaluate wrote a finite FID and the report its row; MLflow recorded how each training stage split its
global batch; and both routes wrote the same models, reference features, samples and FID. It fails when the
training stages ignore resources.train_workers (pipeline/data_parallel.py, flows/ray_train.py) or prepare
skips the small images instead of resizing them up. About 80 s each route on 2 idle cores, 3 minutes beside
other work.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.flows_support import local_ray
from tests.project_copy import copy_project, run

pytestmark = pytest.mark.slow   # the whole chain, data-parallel training stages

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 3, 1
SMALL_FRACTION, CORRUPT = 0.25, 2          # 4 of the 16 files with a short side under 256 px; 2 broken (train)

# What a user shrinks for a CI-sized run; every other rehearsal setting stays as presets/rehearsal.yaml has it.
CI_SIZES = """\
data:
  augment_views: 2              # 2 official crops per train image instead of LlamaGen's ten
train_tokenizer:
  steps: 2
  batch_size: 4                 # 2 workers x micro-batch 2 (auto: each worker's whole share)
  warmup_steps: 1
  checkpoint_every: 2
  eval_every: 2
  log_every: 1
  val_images: 4
train_transformer:
  steps: 2
  batch_size: 8                 # 2 workers x micro-batch 2 x 2 accumulation steps (derived)
  micro_batch: 2
  checkpoint_every: 2
  eval_every: 2
sample:
  per_class: 2
  batch_size: 8
evaluate:
  kid_subset_size: 4
  feature_net_steps: 2
  feature_net_batch_size: 8
"""


def rehearsal_project(project_root: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A temp git repo with the generated folder, the rehearsal preset and the CI sizes applied; its params."""
    repo = copy_project(project_root, tmp_path / "repo")
    py = [sys.executable, "-m"]
    made = run(py + ["flexvar.data.rehearsal", "data/rehearsal", "--classes", str(CLASSES),
                     "--train-per-class", str(TRAIN_PER_CLASS), "--val-per-class", str(VAL_PER_CLASS),
                     "--small-fraction", str(SMALL_FRACTION), "--corrupt", str(CORRUPT)], repo)
    assert f"train={CLASSES * TRAIN_PER_CLASS} val={CLASSES * VAL_PER_CLASS} small=4 corrupt={CORRUPT}" in made.stdout
    run(py + ["flexvar.cli", "preset", "rehearsal"], repo)
    (tmp_path / "ci_sizes.yaml").write_text(CI_SIZES)
    run(py + ["flexvar.cli", "preset", str(tmp_path / "ci_sizes.yaml")], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    rehearsal = yaml.safe_load((project_root / "presets" / "rehearsal.yaml").read_text())
    # the rehearsal's shape is untouched: only the sizes above changed
    assert params["data"]["source"] == "imagefolder:data/rehearsal" and params["data"]["resolution"] == 256
    assert params["tokenizer"] == {**params["tokenizer"], **rehearsal["tokenizer"]}     # downsampling 16, 8912 codes
    assert params["schedule"] == {**params["schedule"], **rehearsal["schedule"]}        # 10 steps, 680 tokens
    assert params["resources"]["train_workers"] == 2 and params["variants"] == rehearsal["variants"]
    return repo, params


@pytest.fixture(scope="module")
def dvc_route(project_root, tmp_path_factory):
    """The rehearsal through `dvc repro`, pinned to 2 CPUs (taskset): the 2-core machine the preset is written
    for, so its single-process stages run torch on 2 threads (torch's default follows the CPU affinity)."""
    repo, params = rehearsal_project(project_root, tmp_path_factory.mktemp("dvc_route"))
    repro = run(["taskset", "-c", "0,1", sys.executable, "-m", "dvc", "repro"], repo, timeout=900)
    return repo, params, repro


@pytest.fixture(scope="module")
def flow_route(project_root, tmp_path_factory):
    """The same rehearsal through `python -m flows.pipeline`'s flow on a local Ray with 2 CPUs."""
    from flows.pipeline import run_pipeline

    repo, params = rehearsal_project(project_root, tmp_path_factory.mktemp("flow_route"))
    local_ray(2)
    return repo, params, run_pipeline(repo)


def test_rehearsal_ci_sized(dvc_route):
    repo, params, repro = dvc_route
    out = repro.stdout + repro.stderr
    d = params["variants"]["depths"][0]
    for stage in check_all_stages_locked(repo, params):      # every stage ran in this repro
        assert f"Running stage '{stage}'" in repro.stdout, stage
    check_outputs(repo, params)

    # both training stages data-parallel on 2 workers (torchrun inside the stage), rank 0 alone logging and writing
    said = "\n".join(line for line in out.splitlines()                 # what the stages said, shown on a failure
                     if any(word in line for word in ("data-parallel", "worker(s)", "wrote")))
    assert out.count("data-parallel on 2 workers (resources.train_workers = 2) via torchrun") == 2, said
    tok = params["train_tokenizer"]
    tok_steps = re.findall(rf"^step {tok['steps']}/{tok['steps']} ", out, re.M)   # the tokenizer's progress line
    assert len(tok_steps) == 1 and out.count("train_tokenizer: wrote") == 1, said
    cfg = params["train_transformer"]
    assert (f"global batch {cfg['batch_size']} = 2 worker(s) x micro-batch {cfg['micro_batch']} "
            f"x 2 accumulation step(s)") in out, said
    assert out.count(f"train_transformer: d{d} wrote") == 1, said
    n = cfg["steps"]                                   # rank 0 alone prints the progress lines
    assert len(re.findall(rf"^train_transformer d{d}: step {n}/{n} loss ", out, re.M)) == 1, said
    check_batch_split(repo, params, launcher="torchrun")


def test_rehearsal_ci_sized_flow(flow_route):
    """The flow ran every stage: the training stages on 2 Ray Train workers (gloo), the single-process
    stages given both cores by the preset; a `dvc repro` after it finds nothing to run."""
    repo, params, result = flow_route
    stages = check_all_stages_locked(repo, params)
    assert result == {name: "ran" for name in stages}
    repro = run([sys.executable, "-m", "dvc", "repro"], repo).stdout
    assert "Running stage" not in repro
    check_outputs(repo, params)
    check_batch_split(repo, params, launcher="caller")    # Ray Train's group, not a torchrun inside the task


def test_both_routes_compute_the_same_bytes(dvc_route, flow_route):
    """`dvc repro` and the flow write identical models, reference features and samples, and the same FID:
    a stage's numbers do not depend on the route. It fails when a stage runs torch on other threads under
    the flow than under `dvc repro` (the feature net on Ray's default 1 CPU: weights up to 5e-4 apart), or
    a route seeds or splits the data differently."""
    (dvc_repo, params, _), (flow_repo, _, _) = dvc_route, flow_route
    d, schedule = params["variants"]["depths"][0], params["variants"]["schedules"][0]
    outs = {"prepare": "data/prepared", "train_tokenizer": "models/tokenizer", f"train_transformer@{d}": f"models/d{d}",
            "train_feature_net": "models/feature_net", "reference_stats": "data/reference"}

    def md5s(repo: Path) -> dict[str, str]:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        return {stage: next(o["md5"] for o in lock[stage]["outs"] if o["path"] == path) for stage, path in outs.items()}

    assert md5s(dvc_repo) == md5s(flow_repo)
    npz = Path("samples") / f"d{d}" / schedule / "samples.npz"
    assert (dvc_repo / npz).read_bytes() == (flow_repo / npz).read_bytes()
    fid = [json.loads((repo / "metrics" / "eval" / f"d{d}" / f"{schedule}.json").read_text())["fid_domain"]
           for repo in (dvc_repo, flow_repo)]
    assert fid[0] == fid[1], fid


def check_all_stages_locked(repo: Path, params: dict) -> list[str]:
    """Every stage of the graph is locked with the rehearsal's params and `dvc status` is clean; the stages.
    (dvc.lock also keeps the committed default's entries for matrix items this params.yaml no longer has.)"""
    dvc = [sys.executable, "-m", "dvc"]
    d, schedule = params["variants"]["depths"][0], params["variants"]["schedules"][0]
    stages = run(dvc + ["stage", "list", "--name-only"], repo).stdout.split()
    assert sorted(stages) == sorted(["prepare", "train_tokenizer", "extract_latents", f"train_transformer@{d}",
                                     f"sample@{d}-{schedule}", "train_feature_net", "reference_stats",
                                     f"evaluate@{d}-{schedule}", "report"])
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert all(stage in lock for stage in stages), sorted(set(stages) - set(lock))
    assert lock["prepare"]["params"]["params.yaml"]["data.source"] == "imagefolder:data/rehearsal"
    assert lock[f"train_transformer@{d}"]["params"]["params.yaml"]["schedule"] == params["schedule"]
    assert "up to date" in run(dvc + ["status"], repo).stdout
    return stages


def check_batch_split(repo: Path, params: dict, launcher: str) -> None:
    """MLflow holds how each training stage split its global batch: 2 workers started by `launcher`, and for
    the transformer 2 accumulation steps of its micro-batch (rank 0 alone tracks: one run each)."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute("select r.name, p.key, p.value from params p join runs r on p.run_uuid = r.run_uuid "
                          "where p.key like 'batch.%'").fetchall()
    split: dict[str, dict[str, str]] = {}
    for name, key, value in rows:
        split.setdefault(name.split()[0], {})[key] = value
    cfg = params["train_transformer"]
    assert split == {"train_tokenizer": {"batch.workers": "2", "batch.micro_batch": "2", "batch.accumulation_steps": "1",
                                         "batch.launcher": launcher},
                     "train_transformer": {"batch.workers": "2", "batch.micro_batch": str(cfg["micro_batch"]),
                                           "batch.accumulation_steps": "2", "batch.launcher": launcher}}, split


def check_outputs(repo: Path, params: dict) -> None:
    """What every stage wrote, read back from its outputs."""
    d, schedule = params["variants"]["depths"][0], params["variants"]["schedules"][0]
    # prepare: the corrupt files skipped and counted, the small ones resized up and kept (read back from the folder)
    corrupt, small = set(), {"train": 0, "val": 0}
    for f in sorted((repo / "data" / "rehearsal").glob("*/*/*.JPEG")):
        try:
            with Image.open(f) as img:
                img.load()
                small[f.parts[-3]] += min(img.size) < 256
        except OSError:
            corrupt.add(f.relative_to(repo).as_posix())
    assert len(corrupt) == CORRUPT and sum(small.values()) == 4
    stats = json.loads((repo / "data" / "prepared" / "stats.json").read_text())
    assert stats["num_skipped"] == CORRUPT
    assert {s["file"] for s in stats["skipped"]} == corrupt          # named as data.source names the folder
    assert stats["totals"] == {"train": CLASSES * TRAIN_PER_CLASS - CORRUPT, "val": CLASSES * VAL_PER_CLASS}
    assert {k: stats["resized_up"].get(k, 0) for k in small} == small and len(stats["classes"]) == CLASSES
    assert stats["stored_short_side"] == math.ceil(256 / 0.88)          # official augment: crops of 88-100%

    # the tokenizer's 16x16 latents at 256 px (downsampling 16), the augmented views cached per train image
    latents = json.loads((repo / "data" / "latents" / "stats.json").read_text())
    assert latents["train"]["shape"] == [stats["totals"]["train"], params["data"]["augment_views"], 32, 16, 16]
    assert latents["val"]["shape"] == [stats["totals"]["val"], 2, 32, 16, 16]              # centre crop and its flip

    train = json.loads((repo / "metrics" / "train" / f"d{d}.json").read_text())
    assert train["steps"] == params["train_transformer"]["steps"] and math.isfinite(train["val_loss"]) and "val_loss_16x16" in train

    # sample: per_class x classes images at 256 px on the 10-step schedule
    info = json.loads((repo / "samples" / f"d{d}" / schedule / "info.json").read_text())
    n = params["sample"]["per_class"] * CLASSES
    assert info["num_images"] == n and info["steps"] == 10 and tuple(info["size"]) == (256, 256)
    assert [s[0] for s in info["scales"]] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert sum(h * w for h, w in info["scales"]) == 680                   # the official 680-token schedule
    with np.load(repo / "samples" / f"d{d}" / schedule / "samples.npz") as npz:
        assert npz["arr_0"].shape == (n, 256, 256, 3) and sorted(set(npz["labels"].tolist())) == list(range(CLASSES))
    assert len(list((repo / "samples" / f"d{d}" / schedule / "images").glob("*.png"))) == n

    # evaluate: FID (and the rest) in the domain feature space; the report has the row
    ev = json.loads((repo / "metrics" / "eval" / f"d{d}" / f"{schedule}.json").read_text())
    assert math.isfinite(ev["fid_domain"]) and ev["fid_domain"] >= 0, ev
    table = json.loads((repo / "reports" / "fid_table.json").read_text())
    assert [(r["depth"], r["schedule"], r["steps"]) for r in table["rows"]] == [(d, schedule, 10)]
