"""`sample` stage on a tiny checkpoint: ADM-format npz, PNGs, per-class grid, MLflow run; bad schedule = exit 2."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from tests.tiny_checkpoint import CLASSES, save_tiny_checkpoint

from pipeline import sample


def write_params(project_root, tmp_path, **sample_overrides):
    params = yaml.safe_load((project_root / "params.yaml").read_text())
    params["sample"].update({"per_class": 2, "batch_size": 3, "top_k": 8, "precision": "fp32", **sample_overrides})
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_sample_stage_writes_adm_npz_pngs_and_grid(project_root, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "models")
    params = write_params(project_root, tmp_path)
    out = tmp_path / "samples" / "d2" / "canonical"
    rc = sample.main(["--params", str(params), "--depth", "2", "--schedule", "canonical", "--model", str(ckpt),
                      "--out", str(out)])
    assert rc == 0
    npz = np.load(out / "samples.npz")
    n = 2 * len(CLASSES)
    assert npz["arr_0"].shape == (n, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].dtype == np.int64 and npz["labels"].tolist() == sorted(list(range(len(CLASSES))) * 2)
    assert len(list((out / "images").glob("*.png"))) == n
    assert (out / "grid.png").is_file() and (out / "info.json").is_file()
    info = json.loads((out / "info.json").read_text())   # the settings object generation took, as it was
    assert info["sampling"] == {"guidance": 1.5, "guidance_schedule": "ramp", "top_k": 8, "top_p": 0.0,
                                "greedy_rule": "official", "precision": "fp32"}
    again = tmp_path / "again"
    assert sample.main(["--params", str(params), "--depth", "2", "--schedule", "canonical", "--model", str(ckpt),
                        "--out", str(again)]) == 0
    assert np.array_equal(np.load(again / "samples.npz")["arr_0"], npz["arr_0"])   # seeded from params


def test_unknown_schedule_and_missing_model_exit_2(project_root, tmp_path, capsys):
    params = write_params(project_root, tmp_path)
    assert sample.main(["--params", str(params), "--depth", "2", "--schedule", "canonical",
                        "--model", str(tmp_path / "nope")]) == 2
    ckpt = save_tiny_checkpoint(tmp_path / "models")
    assert sample.main(["--params", str(params), "--depth", "2", "--schedule", "nope", "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "sample.schedules" in err and "Traceback" not in err


def test_many_classes_are_checked_per_batch_and_drawn_in_a_bounded_grid(project_root, tmp_path):
    """200 classes x 10 samples in batches of 20 under a 25 MB limit: the estimate of one batch
    (~19 MB for the tiny models) fits, the estimate of holding all 2000 images (+14 MB) would not; the
    grid shows 16 evenly chosen classes x 8 images (214 x 286 px, not 200 rows), from 128 kept images."""
    names = [f"k{c}" for c in range(200)]
    ckpt = save_tiny_checkpoint(tmp_path / "models", class_names=names)
    params = write_params(project_root, tmp_path, per_class=10, batch_size=20, max_memory_gb=0.025)
    out = tmp_path / "samples"
    assert sample.main(["--params", str(params), "--depth", "2", "--schedule", "canonical", "--model", str(ckpt),
                        "--out", str(out)]) == 0
    npz = np.load(out / "samples.npz")
    arr, labels = npz["arr_0"], npz["labels"]
    assert arr.shape == (2000, 16, 16, 3)
    info = json.loads((out / "info.json").read_text())
    shown = info["grid"]["classes"]
    assert len(shown) == 16 and shown[0] == 0 and shown[-1] == 199 and shown == sorted(set(shown))
    assert all(12 <= b - a <= 14 for a, b in zip(shown, shown[1:]))          # evenly spread over 0..199
    assert info["grid"]["kept_images"] == 16 * 8 and info["grid"]["per_class"] == 8
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert grid.shape == (16 * 18 - 2, 72 + 8 * 18 - 2, 3)
    for r, c in enumerate(shown):             # row r: the first 8 samples of class c, 2 px apart
        for j, img in enumerate(arr[labels == c][:8]):
            assert np.array_equal(grid[r * 18:r * 18 + 16, 72 + j * 18:72 + j * 18 + 16], img), (r, c, j)


def test_writer_keeps_a_bounded_number_of_images_with_their_own_pixels(tmp_path):
    """1000 classes x 3 samples in batches of 100: 16 classes x 3 kept images, each holding 3x8x8 bytes
    (a view into its batch would hold the batch's 100x3x8x8)."""
    import torch

    labels_N = torch.arange(1000).repeat_interleave(3)
    writer = sample.SampleWriter(tmp_path / "partial", labels_N, [str(c) for c in range(1000)], batch_size=100)
    for s in range(0, len(labels_N), 100):
        writer.write(torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8), labels_N[s:s + 100])
    (tmp_path / "out").mkdir()
    grid = writer.close(tmp_path / "out")
    kept = [img for imgs in writer.kept.values() for img in imgs]
    assert len(kept) == 16 * 3
    assert sum(img.untyped_storage().nbytes() for img in kept) == len(kept) * 3 * 8 * 8
    assert grid["kept_images"] == 48 and len(grid["classes"]) == 16
    assert Image.open(tmp_path / "out" / "grid.png").size == (72 + 3 * 10 - 2, 16 * 10 - 2)


def test_an_interrupted_run_resumes_at_its_next_batch_and_writes_what_one_run_writes(project_root, tmp_path,
                                                                                   monkeypatch, capsys):
    """Ctrl-C after 2 of 4 batches: no OUT, the finished batches and the generator's state kept beside it;
    the next run resumes at batch 2 and its samples.npz, PNGs and grid equal those of an uninterrupted run
    byte for byte (a resume that restarted the random stream would draw other images). A run with other
    settings starts over."""
    ckpt = save_tiny_checkpoint(tmp_path / "models")
    params = write_params(project_root, tmp_path, per_class=2, batch_size=2)      # 4 classes x 2 = 4 batches
    argv = ["--params", str(params), "--depth", "2", "--schedule", "canonical", "--model", str(ckpt)]
    whole = tmp_path / "whole"
    assert sample.main(argv + ["--out", str(whole)]) == 0
    out = tmp_path / "samples" / "d2" / "canonical"
    real = sample.generate_batches

    def interrupted(*args, **kwargs):
        for i, part in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield part

    monkeypatch.setattr(sample, "generate_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample.main(argv + ["--out", str(out)])
    partial = sample.progress_dir(out)
    assert not out.exists() and sorted(p.name for p in (partial / "shards").iterdir()) == ["00000.npy", "00001.npy"]
    monkeypatch.undo()
    capsys.readouterr()
    assert sample.main(argv + ["--out", str(out)]) == 0
    assert "sample: resuming at batch 2 (4 of 8 images done)" in capsys.readouterr().out
    assert not partial.exists() and json.loads((out / "info.json").read_text())["resumed_at_batch"] == 2
    def listing(folder):
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "info.json")

    files = listing(whole)
    assert listing(out) == files and sum(f.endswith(".png") for f in files) == 8 + 1   # + grid.png
    for f in files:
        assert (whole / f).read_bytes() == (out / f).read_bytes(), f

    # interrupted again, then run with another top_k: the kept batches are not mixed into it
    monkeypatch.setattr(sample, "generate_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample.main(argv + ["--out", str(tmp_path / "other")])
    monkeypatch.undo()
    (tmp_path / "p2").mkdir()
    other = write_params(project_root, tmp_path / "p2", per_class=2, batch_size=2, top_k=4)
    fresh = ["--params", str(other), "--depth", "2", "--schedule", "canonical", "--model", str(ckpt)]
    assert sample.main(fresh + ["--out", str(tmp_path / "other")]) == 0
    assert "starting over" in capsys.readouterr().out
    assert sample.main(fresh + ["--out", str(tmp_path / "other_whole")]) == 0
    assert np.array_equal(np.load(tmp_path / "other" / "samples.npz")["arr_0"],
                          np.load(tmp_path / "other_whole" / "samples.npz")["arr_0"])


def test_paper_protocol_is_checked_per_batch():
    """The rehearsal's shape of the paper's protocol (issue 30): 50 x 1000 classes at 256 px, downsampling 16,
    8912 codes, the 10-step 680-token schedule, tokenizer ch 32 and depth 1, guided batches of 100. Sizes
    only: models on the meta device. Refused before at ~101 GB (every image counted as held at once)."""
    import torch

    from flexvar.config import SampleConfig, TokenizerConfig, TransformerConfig
    from flexvar.generation.memory import GIB
    from flexvar.tokenizer.vqvae import VQVAE
    from flexvar.transformer.model import FlexVAR

    with torch.device("meta"):
        vq = VQVAE(TokenizerConfig(ch=32, ch_mult=[1, 1, 2, 2, 4], z_channels=32, codebook_dim=32,
                                   codebook_size=8912))
        model = FlexVAR(TransformerConfig(depth=1), vocab_size=8912, codebook_dim=32, num_classes=1000, pe_size=32)
    scales = [(s, s) for s in [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]]
    cfg = SampleConfig(per_class=50, batch_size=100, guidance=2.5)
    assert cfg.max_memory_gb == 16
    paper = sample.check_memory(cfg, "canonical", model, vq, scales, 50_000, 1000)
    one_each = sample.check_memory(cfg, "canonical", model, vq, scales, 1000, 1000)
    assert paper < 16 * GIB
    assert 0 < paper - one_each < 2 * 2**20          # 49,000 more samples cost their labels only (16 B each)
