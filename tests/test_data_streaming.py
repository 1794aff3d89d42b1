"""Out-of-core data path: the streamed (on-disk) and in-memory paths give the same data, the sampler
shards by rank and resumes by step, the latent cache round-trips through memory-mapped shards,
prepare gives the same dataset with worker processes, and samples.npz streams both ways."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from flexvar.checkpoint import CheckpointError
from flexvar.config import DataConfig, TokenizerConfig, TrainTokenizerConfig
from flexvar.data.arrays import NpzWriter
from flexvar.data.latent_cache import LatentWriter, MappedLatents, load_latents, save_latents
from flexvar.data.prepare import prepare
from flexvar.data.sampling import RangeBatchSampler, StepBatchSampler, batch_indices
from flexvar.data.splits import ArrowImages, SplitError, load_split
from flexvar.evaluation.metrics import load_samples
from flexvar.tokenizer.training import TokenizerTrainer


def test_streamed_split_reads_the_same_pixels_as_the_in_memory_one(tiny_prepared):
    mem, disk = load_split(tiny_prepared, "train"), load_split(tiny_prepared, "train", in_memory_mb=0)
    assert mem.in_memory and not disk.in_memory and len(mem) == len(disk) == 256
    assert torch.equal(mem.labels_N, disk.labels_N) and mem.fingerprint() == disk.fingerprint()
    idx = torch.tensor([255, 0, 17, 17, 128])
    assert torch.equal(mem.take(idx), disk.take(idx)) and disk.take(idx).shape == (5, 3, 32, 32)
    with pytest.raises(RuntimeError, match="streamed from disk"):
        disk.images_NCHW
    sampler = StepBatchSampler(len(mem), 16, seed=1, steps=20)       # 20 steps > one epoch of 16
    a = list(mem.loader(sampler, num_workers=0, flips=True))
    b = list(disk.loader(sampler, num_workers=2, flips=True))         # decoded + flipped in 2 worker processes
    assert len(a) == len(b) == 20
    for (ia, la), (ib, lb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    keys = next(iter(sampler))                                        # key k = image k // 2, mirrored if odd
    flipped = [k for k in keys if k % 2][0]
    assert torch.equal(a[0][0][keys.index(flipped)], mem.images_NCHW[flipped // 2].flip(-1))


def test_sampler_shards_disjointly_by_rank_and_resumes_by_step():
    n, B, world = 64, 8, 2
    per_epoch = n // B
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        parts = [list(StepBatchSampler(n, B, seed=5, start_step=steps[0], steps=per_epoch, rank=r, world=world))
                 for r in range(world)]
        seen = [sorted(i for batch in p for i in batch) for p in parts]
        assert not set(seen[0]) & set(seen[1])                       # disjoint shards of the epoch
        assert sorted(seen[0] + seen[1]) == list(range(n))             # together: the whole epoch once
        for s, b0, b1 in zip(steps, *parts):                           # and exactly the single-process batch
            assert sorted(b0 + b1) == sorted(batch_indices(s, B, n, seed=5).tolist())
    straight = list(StepBatchSampler(n, B, seed=5, steps=12))
    assert list(StepBatchSampler(n, B, seed=5, start_step=7, steps=5)) == straight[7:]
    assert list(RangeBatchSampler(10, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def mapped_rss_kb(buf) -> int:
    """Resident kB of the memory mapping that holds `buf` (from /proc/self/smaps)."""
    addr = np.frombuffer(buf, np.uint8).ctypes.data
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError("mapping not found")


def test_streamed_reads_release_the_mapped_pages(tiny_prepared):
    """A worker reading a whole epoch must not keep the Arrow file resident in its own RSS."""
    disk = load_split(tiny_prepared, "train", in_memory_mb=0)
    every = disk.take(torch.arange(len(disk)))
    assert every.shape == (256, 3, 32, 32)
    mm = disk.arrow._maps[0]
    assert mapped_rss_kb(mm) == 0                                      # released after the read
    total = sum(mm[i] for i in range(0, len(mm), 4096))                # control: touching the pages shows them
    assert total >= 0 and mapped_rss_kb(mm) >= len(mm) // 4096 * 4 // 2
    again = pickle.loads(pickle.dumps(disk))                           # a worker gets paths, maps on first read
    assert again.arrow._maps is None and torch.equal(again.take([3, 1]), every[[3, 1]])


def test_arrow_files_that_disagree_with_the_split_name_the_file_and_the_fix(tiny_prepared):
    """Arrow files holding another number of images than the split says: a one-line error (exit 2 in a
    stage), not a wrong read."""
    disk = load_split(tiny_prepared, "train", in_memory_mb=0)
    assert len(disk.arrow.take([0, 1])) == 2
    wrong = ArrowImages(disk.arrow.paths, disk.arrow.num_rows + 1)
    with pytest.raises(SplitError, match="256 images in the Arrow files, 257 expected; rerun the prepare stage"):
        wrong.take([0])


def test_latent_gathers_release_the_mapped_pages(tmp_path):
    """A training worker gathering rows for an epoch must not keep the latent cache in its own RSS."""
    z = torch.randn(512, 2, 8, 4, 4, generator=torch.Generator().manual_seed(1))   # 512 x 1 KB per image
    save_latents(tmp_path / "train", z, torch.zeros(512, dtype=torch.long), ["a"], "sha", shard_items=256)
    cache = load_latents(tmp_path, "train", in_memory_mb=0).latents_N2CHW
    items = torch.randperm(1024, generator=torch.Generator().manual_seed(2))
    for s in range(0, 1024, 64):                                       # one epoch of (image, flip) keys
        batch = items[s:s + 64]
        assert torch.equal(cache[batch // 2, batch % 2], z[batch // 2, batch % 2])
    shard = cache.maps()[0]
    assert mapped_rss_kb(shard._mmap) == 0                             # released after every gather
    assert float(np.asarray(shard).sum()) != 0 and mapped_rss_kb(shard._mmap) >= 200   # control: reading shows


def test_batches_are_slices_of_one_seeded_randperm_per_epoch():
    """The epoch permutation is cached, not recomputed per step; the batches must stay torch.randperm's
    (so runs and resume checkpoints from before the cache continue identically)."""
    n, B, seed = 50, 8, 3
    per_epoch = n // B
    for step in range(3 * per_epoch):
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        got = batch_indices(step, B, n, seed)
        assert got.dtype == torch.int64 and torch.equal(got, perm[pos * B:(pos + 1) * B])
        got.fill_(-1)                                                  # a caller changing its batch
    assert torch.equal(batch_indices(0, B, n, seed),                   # leaves the cached order intact
                       torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003))[:B])
    wrapped = torch.randperm(5, generator=torch.Generator().manual_seed(seed * 100_003 + 1))
    assert torch.equal(batch_indices(1, 8, 5, seed), wrapped[torch.arange(8) % 5])   # fewer items than a batch


def test_tokenizer_trains_identically_on_both_paths(tiny_prepared):
    tok = TokenizerConfig(ch=8, ch_mult=[1, 2], z_channels=8, codebook_dim=4, codebook_size=16)
    cfg = TrainTokenizerConfig(steps=3, batch_size=4, warmup_steps=1, precision="fp32", num_scales=2)
    weights = []
    for split, workers in ((load_split(tiny_prepared, "train"), 0), (load_split(tiny_prepared, "train", 0), 1)):
        trainer = TokenizerTrainer(tok, cfg, 0, split, torch.device("cpu"), num_workers=workers)
        trainer.fit()
        weights.append(trainer.model.state_dict())
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


def test_latent_cache_round_trips_through_shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 2, 4, 3, 3, generator=g)
    labels = torch.arange(10) % 3
    save_latents(tmp_path / "train", z, labels, ["a", "b", "c"], "sha", shard_items=4, block=3)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "labels.npy", "meta.json", "shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    assert np.load(tmp_path / "train" / "shard_00002.npy").shape == (2, 2, 4, 3, 3)
    mapped, mem = load_latents(tmp_path, "train", in_memory_mb=0), load_latents(tmp_path, "train")
    assert isinstance(mapped.latents_N2CHW, MappedLatents) and mem.in_memory and torch.equal(mem.latents_N2CHW, z)
    assert mapped.latent_hw == (3, 3) and mapped.codebook_dim == 4 and mapped.tokenizer_sha256 == "sha"
    items = torch.tensor([19, 0, 5, 8, 3, 4, 11])                      # crosses every shard boundary
    assert torch.equal(mapped.latents_N2CHW[items // 2, items % 2], z[items // 2, items % 2])
    assert torch.equal(mapped.latents_N2CHW[2:9, 0], z[2:9, 0]) and torch.equal(mapped.labels_N, labels)
    assert len(pickle.dumps(mapped.latents_N2CHW)) < 1000               # workers get paths, not data
    save_latents(tmp_path / "half", z, labels, ["a", "b", "c"], "sha", dtype="float16", shard_items=4)
    assert np.load(tmp_path / "half" / "shard_00000.npy").dtype == np.float16
    half = load_latents(tmp_path, "half", in_memory_mb=0).latents_N2CHW[torch.arange(10), 1]
    assert torch.equal(half, z[:, 1].half().float())
    (tmp_path / "train" / "shard_00001.npy").unlink()
    with pytest.raises(CheckpointError, match="shard_00001.npy is missing"):
        load_latents(tmp_path, "train")
    short = LatentWriter(tmp_path / "short", 10, (2, 4, 3, 3), ["a"], "sha")
    short.write(z[:5], labels[:5])
    with pytest.raises(ValueError, match="5 latents written, 10 expected"):
        short.close()
    with pytest.raises(ValueError, match="do not fit the declared 5"):
        save_latents(tmp_path / "long", z, torch.arange(5), ["a"], "sha")
    assert not list(tmp_path.glob("*short*")) and not list(tmp_path.glob("*long*"))   # nothing half-written


def test_prepare_with_workers_writes_the_same_dataset(tmp_path):
    cfg = DataConfig(resolution=16, num_train=40, num_val=8)
    one = prepare(cfg, seed=0, out_dir=tmp_path / "one")
    two = prepare(cfg.model_copy(update={"num_workers": 2}), seed=0, out_dir=tmp_path / "two")
    assert one["content_hash"] == two["content_hash"] and one["totals"] == {"train": 40, "val": 8}
    a, b = load_split(tmp_path / "one", "val"), load_split(tmp_path / "two", "val")
    assert torch.equal(a.images_NCHW, b.images_NCHW) and a.labels_N.tolist() == [i % 8 for i in range(8)]


def test_streamed_npz_is_standard_and_read_back_mapped(tmp_path):
    images_NHWC = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    w = NpzWriter(tmp_path / "s.npz")
    arr, stream = w.member("arr_0", images_NHWC.shape, np.uint8)
    for s in range(0, 7, 3):
        arr.write(images_NHWC[s:s + 3])
    arr.close()
    stream.close()
    labels, stream = w.member("labels", (7,), np.int64)
    labels.write(np.arange(7))
    labels.close()
    stream.close()
    w.close()
    with np.load(tmp_path / "s.npz") as npz:                           # what the ADM evaluator does
        assert np.array_equal(npz["arr_0"], images_NHWC) and npz["labels"].tolist() == list(range(7))
    images_NCHW, lab = load_samples(tmp_path / "s.npz")
    assert images_NCHW.shape == (7, 3, 5, 4) and not images_NCHW.is_contiguous()   # a view of the file, not a copy
    assert torch.equal(images_NCHW.permute(0, 2, 3, 1), torch.from_numpy(images_NHWC)) and lab.tolist() == list(range(7))
    with pytest.raises(ValueError, match="rows of shape"):
        NpzWriter(tmp_path / "t.npz").member("arr_0", (2, 5, 4, 3), np.uint8)[0].write(images_NHWC[:3])


PEAK_SCRIPT = r"""
import json, sys
import torch
from flexvar.data.sampling import StepBatchSampler
from flexvar.data.splits import decode_png_NCHW, load_split

def peak_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])

prepared, in_memory_mb, batch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
warm = load_split(prepared, "val", in_memory_mb=0)   # warm up: imports, Arrow, the loader and decoder
for _ in warm.loader(StepBatchSampler(len(warm), batch, seed=0, steps=4)):
    pass
before = peak_kb()
split = load_split(prepared, "train", in_memory_mb=in_memory_mb)
seen, total = 0, 0
for images_BCHW, labels_B in split.loader(StepBatchSampler(len(split), batch, seed=0, steps=len(split) // batch)):
    seen += len(labels_B)
    total += int(images_BCHW[:, :, 0, 0].sum())  # the pixels are read
print(json.dumps({"in_memory": split.in_memory, "seen": seen, "peak_growth_mb": (peak_kb() - before) / 1024}))
"""


def noise_split(path, n_train: int, n_val: int, px: int) -> None:
    """A prepared split in prepare's layout (PNG `image`, ClassLabel `label`) of incompressible noise images,
    so the Arrow file is as large as the decoded pixels."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(n)],
             "label": [i % 4 for i in range(n)]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcd"))}))
    datasets.DatasetDict({"train": split(n_train), "val": split(n_val)}).save_to_disk(str(path))


def test_streamed_epoch_peak_memory_is_bounded_by_the_batch(tmp_path):
    """A whole epoch of a 94 MB split through the real loader, in a fresh process: the streamed path's peak
    RSS grows by a small fraction of the split (the batch and the decoder), while the in-memory path on the
    same files (the control, which this measurement must see) grows by about the split's size."""
    import subprocess
    import sys

    n, px, batch = 8000, 64, 16
    noise_split(tmp_path / "prepared", n, 64, px)
    decoded_mb = n * 3 * px * px / 2 ** 20                              # 93.8 MB
    file_mb = sum(p.stat().st_size for p in (tmp_path / "prepared" / "train").glob("*.arrow")) / 2 ** 20
    assert file_mb > 0.9 * decoded_mb                                   # noise: the file holds as many bytes

    def peak(in_memory_mb: float) -> dict:
        r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "prepared"), str(in_memory_mb),
                            str(batch)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    streamed, in_memory = peak(0), peak(10 * decoded_mb)
    print(f"split {decoded_mb:.1f} MB decoded, {file_mb:.1f} MB Arrow; peak RSS growth over one epoch: "
          f"streamed {streamed['peak_growth_mb']:.1f} MB, in memory {in_memory['peak_growth_mb']:.1f} MB")
    assert not streamed["in_memory"] and in_memory["in_memory"] and streamed["seen"] == in_memory["seen"] == n
    assert in_memory["peak_growth_mb"] > 0.8 * decoded_mb               # the control: a copy of the split shows
    assert streamed["peak_growth_mb"] < 0.2 * decoded_mb                # the streamed path: O(batch), not O(split)
