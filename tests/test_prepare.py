"""The prepare stage on every source kind, with planted bad inputs, determinism and clean failures."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexvar.config import DataConfig
from flexvar.data.splits import load_split
from flexvar.data.prepare import DataError, prepare

RES = 32


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _builtin(tmp: Path, seed: int, name: str, source: str = "builtin:shapes") -> tuple[dict, Path]:
    out = tmp / name
    stats = prepare(DataConfig(source=source, resolution=RES, num_train=96, num_val=24), seed=seed, out_dir=out)
    return stats, out


@pytest.mark.parametrize("source", ["builtin:shapes", "builtin:glyphs", "builtin:icons"])
def test_builtin_deterministic_and_seed_dependent(tmp_path, source):
    s1, o1 = _builtin(tmp_path, 0, "a", source)
    s2, o2 = _builtin(tmp_path, 0, "b", source)
    s3, o3 = _builtin(tmp_path, 1, "c", source)
    assert s1["content_hash"] == s2["content_hash"] != s3["content_hash"]
    assert _tree_digest(o1) == _tree_digest(o2)  # byte-identical on disk
    assert _tree_digest(o1) != _tree_digest(o3)
    assert s1["totals"] == {"train": 96, "val": 24}
    assert len(s1["counts"]["train"]) == 8 and set(s1["counts"]["train"].values()) == {12}


def test_builtin_loads_as_tensors(tiny_prepared):
    split = load_split(tiny_prepared, "train")
    assert split.images_NCHW.shape == (256, 3, 32, 32) and split.images_NCHW.dtype.is_floating_point is False
    assert split.num_classes == 8 and int(split.labels_N.max()) == 7
    # classes differ visually: mean images of two classes are far apart
    a = split.images_NCHW[split.labels_N == 5].float().mean(0)
    b = split.images_NCHW[split.labels_N == 0].float().mean(0)
    assert (a - b).abs().mean() > 1.0


def _save(path: Path, img: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def _rgb(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def make_folder(root: Path, with_bad: bool = True, with_val: bool = False) -> dict[str, str]:
    """Two classes of valid RGB images plus one planted file of each awkward kind.

    Returns {file name: expected outcome} for the planted files.
    """
    for c in ("cats", "dogs"):
        for i in range(6):
            _save(root / "train" / c / f"{c}{i}.png", _rgb(zlib.crc32(f"{c}{i}".encode()) % 1000))
        if with_val:
            for i in range(2):
                _save(root / "val" / c / f"v{c}{i}.jpg", _rgb(500 + i), quality=95)
    if not with_bad:
        return {}
    d = root / "train" / "cats"
    arr16 = (np.random.default_rng(1).integers(0, 65535, (40, 40))).astype(np.uint16)
    _save(d / "gray.png", _rgb(1).convert("L"))
    _save(d / "palette.png", _rgb(2).convert("P"))
    _save(d / "rgba.png", _rgb(3).convert("RGBA"))
    _save(d / "cmyk.jpg", _rgb(4).convert("CMYK"))
    _save(d / "deep16.png", Image.fromarray(arr16))
    good = (d / "cats0.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "notimage.jpg").write_bytes(b"this is a text file with an image extension\n")
    (d / "readme.txt").write_text("not an image; ignored by extension\n")
    _save(d / "tiny.png", _rgb(5, size=12))
    return {"gray.png": "ok", "palette.png": "ok", "rgba.png": "ok", "cmyk.jpg": "ok", "deep16.png": "ok",
            "truncated.png": "skip", "notimage.jpg": "skip", "tiny.png": "skip"}


def test_imagefolder_with_planted_bad_files(tmp_path):
    planted = make_folder(tmp_path / "src")
    out = tmp_path / "prepared"
    stats = prepare(DataConfig(source=f"imagefolder:{tmp_path / 'src'}", resolution=RES, val_fraction=0.25,
                               upscale_small=False), seed=0, out_dir=out)
    skipped = {Path(s["file"]).name: s["reason"] for s in stats["skipped"]}
    assert set(skipped) == {n for n, o in planted.items() if o == "skip"}
    assert stats["num_skipped"] == 3
    assert "smaller than the target" in skipped["tiny.png"] and "data.upscale_small" in skipped["tiny.png"]
    total = sum(stats["totals"].values())
    assert total == 12 + 5  # 12 regular + 5 converted (gray, palette, RGBA, CMYK, 16-bit)
    assert stats["classes"] == ["cats", "dogs"]
    for split in ("train", "val"):
        s = load_split(out, split)
        assert s.images_NCHW.shape[1:] == (3, RES, RES)
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["num_skipped"] == 3


def test_imagefolder_val_split_and_upscale(tmp_path):
    make_folder(tmp_path / "src", with_bad=True, with_val=True)
    stats = prepare(DataConfig(source=f"imagefolder:{tmp_path / 'src'}", resolution=RES, upscale_small=True),
                    seed=0, out_dir=tmp_path / "out")
    assert stats["totals"]["val"] == 4  # the val/ folder is used, not a split of train
    assert {Path(s["file"]).name for s in stats["skipped"]} == {"truncated.png", "notimage.jpg"}


def test_fail_mode_stops_cleanly(tmp_path):
    make_folder(tmp_path / "src")
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"bad image .*(truncated|notimage|tiny).*on_bad_image"):
        prepare(DataConfig(source=f"imagefolder:{tmp_path / 'src'}", resolution=RES, on_bad_image="fail",
                           upscale_small=False), seed=0, out_dir=out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]  # no temp leftovers


def test_missing_path_empty_class_no_valid_images(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(DataConfig(source=f"imagefolder:{tmp_path / 'nope'}", resolution=RES), seed=0, out_dir=tmp_path / "o")
    make_folder(tmp_path / "src", with_bad=False)
    (tmp_path / "src" / "train" / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class contains no image files"):
        prepare(DataConfig(source=f"imagefolder:{tmp_path / 'src'}", resolution=RES), seed=0, out_dir=tmp_path / "o")
    # every image too small -> nothing valid -> error, no output
    for p in (tmp_path / "src" / "train").rglob("*.png"):
        p.unlink()
    (tmp_path / "src" / "train" / "empty_class").rmdir()
    for c in ("cats", "dogs"):
        for i in range(3):
            _save(tmp_path / "src" / "train" / c / f"s{i}.png", _rgb(i, size=8))
    with pytest.raises(DataError, match="no valid images"):
        prepare(DataConfig(source=f"imagefolder:{tmp_path / 'src'}", resolution=RES, upscale_small=False), seed=0,
                out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_hf_source_from_local_dataset(tmp_path):
    """The hf: path runs `datasets.load_dataset` — here on a local parquet dataset (no network)."""
    import datasets

    imgs = [_rgb(i) for i in range(10)]
    feats = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"img": imgs, "y": [i % 2 for i in range(10)]}, features=feats)
    (tmp_path / "hfds" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hfds" / "data" / "train-00000-of-00001.parquet"))
    stats = prepare(DataConfig(source=f"hf:{tmp_path / 'hfds'}", resolution=RES, image_column="img",
                               label_column="y", val_fraction=0.2), seed=0, out_dir=tmp_path / "out")
    assert stats["totals"] == {"train": 8, "val": 2} and stats["classes"] == ["a", "b"]
    with pytest.raises(DataError, match="column 'image' not in"):
        prepare(DataConfig(source=f"hf:{tmp_path / 'hfds'}", resolution=RES, label_column="y"), seed=0,
                out_dir=tmp_path / "out2")


def test_stage_cli_error_is_one_line(tmp_path, project_root):
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: imagefolder:{tmp_path / 'missing'}\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=project_root)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_generated_imagenet_folder_keeps_small_skips_corrupt_and_writes_beside(tmp_path, monkeypatch):
    """prepare on a CI-sized generated ImageNet-layout folder (flexvar/data/rehearsal.py): 4 classes,
    40 JPEGs, 8 with a short side under the resolution, 2 corrupt. Small images are resized up (kept),
    the corrupt ones skipped and counted; with data.augment official the stored short side is
    ceil(64 / 0.88) = 73 and readers get 64 x 64 centre crops; nothing is written to the system temp
    folder (tempfile points at a file, so any temp folder there fails) and nothing is left beside the output;
    the main process decodes no image for the content hash (workers hash what they decoded)."""
    import os
    import tempfile

    import datasets

    import flexvar.data.prepare as prepare_mod
    import flexvar.grid  # noqa: F401  (imports torchvision -> torch._dynamo, which makes its cache folder in the temp dir)
    from flexvar.data.rehearsal import make_imagenet_like

    made = make_imagenet_like(tmp_path / "src", classes=4, train_per_class=8, val_per_class=2, resolution=64,
                              small_fraction=0.2, corrupt=2, seed=0)
    assert (made["train"], made["val"], len(made["small"]), len(made["corrupt"])) == (32, 8, 8, 2)
    assert sorted(p.name for p in (tmp_path / "src" / "train").iterdir()) == sorted(
        p.name for p in (tmp_path / "src" / "val").iterdir())
    import multiprocessing.util
    multiprocessing.util.get_temp_dir()   # the workers' forkserver socket lives there (bytes, not data): made first
    no_temp = tmp_path / "no-system-temp"               # a file, not a folder: any use of the system temp fails
    no_temp.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(no_temp))
    monkeypatch.setenv("TMPDIR", str(no_temp))
    main_pid, opened, at_preview = os.getpid(), [], []
    real_open, real_preview = Image.open, prepare_mod.preview_grid
    monkeypatch.setattr(Image, "open", lambda *a, **k: (opened.append(os.getpid()), real_open(*a, **k))[1])
    monkeypatch.setattr(prepare_mod, "preview_grid",
                        lambda *a: (at_preview.append(opened.count(main_pid)), real_preview(*a))[1])

    out = tmp_path / "work" / "prepared"
    stats = prepare(DataConfig(source=f"imagefolder:{tmp_path / 'src'}", resolution=64, augment="official",
                               num_workers=2), seed=0, out_dir=out)
    assert at_preview == [0]                             # no decode in the main process while streaming
    assert stats["num_skipped"] == 2 and sorted(s["file"] for s in stats["skipped"]) == sorted(made["corrupt"])
    assert stats["totals"] == {"train": 31, "val": 7} and stats["stored_short_side"] == 73
    assert sum(stats["resized_up"].values()) == len(made["small"]) == 8      # every small image kept, resized up
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]     # no temp folder left beside it
    stored = datasets.load_from_disk(str(out))["train"]
    assert {min(Image.open(io.BytesIO(r["bytes"])).size) for r in stored.cast_column(
        "image", datasets.Image(decode=False))["image"]} == {73}
    split = load_split(out, "train", in_memory_mb=0)
    assert split.take(torch.arange(len(split))).shape == (31, 3, 64, 64)

    center = prepare(DataConfig(source=f"imagefolder:{tmp_path / 'src'}", resolution=64), seed=0,
                     out_dir=tmp_path / "work" / "center")
    assert center["num_skipped"] == 2 and load_split(tmp_path / "work" / "center", "val").images_NCHW.shape == (7, 3, 64, 64)


def test_imagefolder_output_does_not_depend_on_the_checkouts_location(tmp_path, monkeypatch):
    """A relative `imagefolder:` source prepared in two checkouts at different paths gives byte-identical
    data/prepared (docs/pipeline.md: same params and code, same bytes): stats.json names a skipped file as the
    source names its folder (`src/train/<class>/<file>`), its reason too, never the checkout's absolute path."""
    from flexvar.data.rehearsal import make_imagenet_like

    outs = []
    for checkout in ("a", "b/deeper"):
        work = tmp_path / checkout
        made = make_imagenet_like(work / "src", classes=2, train_per_class=3, val_per_class=1, resolution=RES,
                                  small_fraction=0.25, corrupt=2, seed=0)
        monkeypatch.chdir(work)
        stats = prepare(DataConfig(source="imagefolder:src", resolution=RES), seed=0, out_dir=work / "prepared")
        assert sorted(s["file"] for s in stats["skipped"]) == sorted(
            Path(f).relative_to(work).as_posix() for f in made["corrupt"])
        assert not any(str(tmp_path) in s["reason"] for s in stats["skipped"]), stats["skipped"]
        outs.append(work / "prepared")
    assert _tree_digest(outs[0]) == _tree_digest(outs[1])


# --------------------------------------------------------------------------- the worker pool
HELD_BY_THE_CALLER = threading.Lock()


def _lock_is_free(_task) -> bool:
    """In a worker: whether the caller's lock, held while the pool runs, is free in this process."""
    if not HELD_BY_THE_CALLER.acquire(timeout=0.2):
        return False
    HELD_BY_THE_CALLER.release()
    return True


def test_prepare_workers_do_not_inherit_the_callers_held_locks():
    """A pool forked from a threaded caller (Prefect's event loop, Ray's) copies every lock some thread
    holds at that moment, held, and a worker that needs one hangs; so does the pool's shutdown (a CI
    run hung 600 s in Pool.terminate). The workers must start from a clean process: the lock this test
    holds must be free in them."""
    from flexvar.data.prepare import run_tasks
    with HELD_BY_THE_CALLER:
        assert list(run_tasks(_lock_is_free, range(4), num_workers=2, chunksize=1)) == [True] * 4


def _die(task):
    if task == 2:
        os._exit(3)     # a worker killed mid-task (the OOM killer, a crash in a C decoder)
    return task


@pytest.mark.timeout(120)
def test_a_dead_prepare_worker_stops_the_run_with_an_error():
    """multiprocessing.Pool replaces a dead worker and waits forever for the task it lost."""
    from flexvar.data.prepare import run_tasks
    with pytest.raises(DataError, match="a prepare worker process died.*data.num_workers: 0"):
        list(run_tasks(_die, range(8), num_workers=2, chunksize=1))
