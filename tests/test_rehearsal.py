"""The rehearsal, CI-sized (issue 30): the d16 workload's shape end to end under a real `dvc repro`.

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
evaluate wrote a finite FID and the report its row. It fails when the training stages ignore
resources.train_workers (pipeline/data_parallel.py) or prepare skips the small images instead of resizing
them up. About 3 minutes (110 s of CPU) on 2 cores shared with other work.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.project_copy import copy_project, run

pytestmark = pytest.mark.slow   # real dvc repro of the whole chain, torchrun inside the training stages

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


def test_rehearsal_ci_sized(project_root, tmp_path):
    repo = copy_project(project_root, tmp_path / "repo")
    py, dvc = [sys.executable, "-m"], [sys.executable, "-m", "dvc"]
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

    repro = run(dvc + ["repro"], repo, timeout=900)
    out = repro.stdout + repro.stderr
    d, schedule = params["variants"]["depths"][0], params["variants"]["schedules"][0]

    # every stage of the graph ran in this repro and is locked with the rehearsal's params; nothing left to do
    # (dvc.lock also keeps the committed default's entries for matrix items this params.yaml no longer has)
    stages = run(dvc + ["stage", "list", "--name-only"], repo).stdout.split()
    assert sorted(stages) == sorted(["prepare", "train_tokenizer", "extract_latents", f"train_transformer@{d}",
                                     f"sample@{d}-{schedule}", "train_feature_net", "reference_stats",
                                     f"evaluate@{d}-{schedule}", "report"])
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in stages:
        assert f"Running stage '{stage}'" in repro.stdout, stage
        assert stage in lock, stage
    assert lock["prepare"]["params"]["params.yaml"]["data.source"] == "imagefolder:data/rehearsal"
    assert lock[f"train_transformer@{d}"]["params"]["params.yaml"]["schedule"] == params["schedule"]
    assert "up to date" in run(dvc + ["status"], repo).stdout

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

    # both training stages data-parallel on 2 workers, rank 0 alone logging and writing; the transformer's
    # global batch split into the accumulation the params imply
    said = "\n".join(line for line in out.splitlines()                 # what the stages said, shown on a failure
                     if any(word in line for word in ("data-parallel", "worker(s)", "wrote")))
    assert out.count("data-parallel on 2 workers (resources.train_workers = 2) via torchrun") == 2, said
    tok = params["train_tokenizer"]
    tok_steps = re.findall(rf"^step {tok['steps']}/{tok['steps']} ", out, re.M)   # the tokenizer's progress line
    assert len(tok_steps) == 1 and out.count("train_tokenizer: wrote") == 1, said
    cfg, workers = params["train_transformer"], params["resources"]["train_workers"]
    accum = cfg["batch_size"] // (workers * cfg["micro_batch"])
    assert accum == 2 and workers * cfg["micro_batch"] * accum == cfg["batch_size"]
    assert (f"global batch {cfg['batch_size']} = {workers} worker(s) x micro-batch {cfg['micro_batch']} "
            f"x {accum} accumulation step(s)") in out, said
    assert out.count(f"train_transformer: d{d} wrote") == 1, said
    n = cfg["steps"]                                   # rank 0 alone prints the progress lines
    assert len(re.findall(rf"^train_transformer d{d}: step {n}/{n} loss ", out, re.M)) == 1, said
    train = json.loads((repo / "metrics" / "train" / f"d{d}.json").read_text())
    assert train["steps"] == cfg["steps"] and math.isfinite(train["val_loss"]) and "val_loss_16x16" in train

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
