"""`flexvar init imagefolder:<dir>` writes params sized to the folder (validated, comments kept), and
`flexvar check` prints the same run-time estimate; bad sources are one line, exit 2 (tests/test_bad_input.py)."""
import io

import pytest
import yaml
from PIL import Image, ImageDraw, ImageFont

from flexvar.cli import main
from flexvar.config import load_params
from flexvar.presets import PRESETS_DIR
from flexvar.schedules import canonical_sides, schedule_size, schedule_steps, sides_of, spec_scales

EMBEDDED = PRESETS_DIR.parent / "params.yaml"
# the keys init may change over the embedded default (everything else stays as committed)
INIT_KEYS = {"data.source", "data.resolution", "data.upscale_small", "tokenizer.ch_mult", "tokenizer.codebook_size",
             "sample.per_class", "sample.top_k", "evaluate.feature_net_steps", "sample.schedules", "sweep.eval_panel",
             *(f"{s}.{k}" for s in ("train_tokenizer", "train_transformer")
               for k in ("steps", "warmup_steps", "eval_every", "checkpoint_every"))}


def glyph_folder(root, side: int, per_class: int, bad: int):
    """Digits 0-3 drawn with PIL's font, `per_class` train images each (widths side..side+9) and 2 val images,
    plus `bad` unreadable files (junk bytes, truncated PNGs) and a text file."""
    font = ImageFont.load_default(size=side * 3 // 4)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(4):
            d = root / split / f"digit{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", (side + i % 10, side), (255 - 5 * (i % 40), 255, 255))
                ImageDraw.Draw(img).text((side // 4 + i % 5, 0), str(c), fill=(6 * (i % 40), 0, 0), font=font)
                img.save(d / f"{i}.png")
    png = io.BytesIO()
    Image.new("RGB", (side, side), "red").save(png, "PNG")
    for k in range(bad):
        path = root / "train" / f"digit{k % 4}" / f"bad{k}.png"
        path.write_bytes(b"junk" if k % 2 else png.getvalue()[:len(png.getvalue()) // 2])
    (root / "train" / "digit0" / "README.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("folders")
    return {"small": glyph_folder(base / "small", 24, 40, bad=2), "big": glyph_folder(base / "big", 96, 40, bad=5)}


def sides(params, name, panel=False):
    """Long sides of a named schedule of sample.schedules (or sweep.eval_panel) at the params' latent."""
    spec = (params.sweep.eval_panel if panel else params.sample.schedules)[name]
    return sides_of(spec_scales(spec, (params.latent_size,) * 2, params.tokenizer.downsample))


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def changed_keys(a, b, prefix=""):
    """Dotted keys whose values differ (sections recurse; schedules compared whole)."""
    out = set()
    for k in set(a) | set(b):
        key = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict) and key not in INIT_KEYS:
            out |= changed_keys(a[k], b[k], key + ".")
        elif a.get(k) != b.get(k):
            out.add(key)
    return out


def test_params_are_sized_to_the_folder(folders, tmp_path, capsys):
    chosen = {}
    for name, folder in folders.items():
        out = tmp_path / f"{name}.yaml"
        rc, stdout, err = run(["init", f"imagefolder:{folder}", "--params", str(out), "--rate-gflops", "50"], capsys)
        assert rc == 0, err
        params = load_params(out)                    # validates through flexvar.config
        text = out.read_text()
        assert "Every key is documented in flexvar/config.py." in text     # the embedded file's comments kept
        assert changed_keys(yaml.safe_load(EMBEDDED.read_text()), yaml.safe_load(text)) <= INIT_KEYS
        assert params.data.source == f"imagefolder:{folder}"
        assert params.sample.top_k == 0                  # the full distribution: real data keeps its variety
        n, res = params.latent_size, params.data.resolution
        assert sides(params, "canonical") == canonical_sides(n)
        assert schedule_size(params, "large") == (2 * res, 2 * res)
        assert schedule_steps(params, "short") < schedule_steps(params, "canonical") < schedule_steps(params, "long")
        assert "estimated dvc repro time" in stdout
        assert text.startswith(f"# written by: flexvar init imagefolder:{folder} --budget cpu --minutes 30 "
                               f"--rate-gflops 50\n")
        chosen[name] = params
    small, big = chosen["small"], chosen["big"]
    assert (small.data.resolution, big.data.resolution) == (16, 64)     # median short sides 24 and 96, cpu cap 64
    assert big.tokenizer.downsample > small.tokenizer.downsample          # bigger images: more downsampling
    assert (small.tokenizer.downsample, big.tokenizer.downsample) == (2, 8)
    assert small.latent_size == big.latent_size == 8                     # the cpu budget's latent


def test_bad_files_are_counted_and_named(folders, tmp_path, capsys):
    rc, stdout, err = run(["init", f"imagefolder:{folders['big']}", "--params", str(tmp_path / "p.yaml"),
                           "--rate-gflops", "50"], capsys)
    assert rc == 0, err
    first = stdout.splitlines()[0]
    assert "4 classes, 160 train + 8 val images" in first and "5 bad files skipped" in first
    assert first.count("bad") == 1 + 3 and "1 other files ignored" in first        # 3 names shown, not 5
    assert "short sides 96..96 px" in first


def test_budget_and_minutes_scale_the_choices(folders, tmp_path, capsys):
    big = f"imagefolder:{folders['big']}"
    assert run(["init", big, "--params", str(tmp_path / "gpu.yaml"), "--budget", "gpu", "--minutes", "60"],
               capsys)[0] == 0
    gpu = load_params(tmp_path / "gpu.yaml")
    assert gpu.latent_size == 16 and gpu.tokenizer.downsample == 4 and gpu.sample.per_class == 50
    assert sides(gpu, "canonical") == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    steps = {}
    for minutes in (20, 60):
        out = tmp_path / f"m{minutes}.yaml"
        assert run(["init", big, "--params", str(out), "--minutes", str(minutes), "--rate-gflops", "30"],
                   capsys)[0] == 0
        p = load_params(out)
        steps[minutes] = (p.train_tokenizer.steps, p.train_transformer.steps)
    assert steps[60][0] > steps[20][0] and steps[60][1] > steps[20][1], steps
    assert run(["init", big, "--params", str(tmp_path / "r.yaml"), "--resolution", "32", "--rate-gflops", "30"],
               capsys)[0] == 0
    assert load_params(tmp_path / "r.yaml").tokenizer.downsample == 4            # 32 px -> 8x8


def test_check_prints_the_same_estimate(folders, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    _, init_out, _ = run(["init", f"imagefolder:{folders['small']}", "--params", str(out), "--rate-gflops", "40,80"],
                         capsys)
    rc, check_out, err = run(["check", "--params", str(out), "--rate-gflops", "40,80"], capsys)
    assert rc == 0, err
    line = next(s for s in check_out.splitlines() if s.startswith("estimated dvc repro time"))
    assert line in init_out.splitlines()
    assert "given: tokenizer 40 GFLOP/s, transformer 80 GFLOP/s" in check_out
    rc, measured, err = run(["check", "--params", str(EMBEDDED)], capsys)   # builtin source, rates measured here
    assert rc == 0, err
    assert "estimated dvc repro time" in measured and "measured on this machine (cpu" in measured
    rc, gpu, err = run(["check", "--params", str(EMBEDDED), "--budget", "gpu"], capsys)
    assert rc == 0, err
    import torch
    assert ("measured on this machine (cuda" if torch.cuda.is_available() else "assumed for a GPU (none here)") in gpu


def test_flop_count_matches_the_transformer_formula():
    """The counted forward FLOPs of the embedded d4 transformer over the 155-token canonical schedule against
    the textbook count: 2 x (block matmul weights + head) per token + the dense attention's QK^T and AV."""
    from flexvar.estimate import _models, token_scales, transformer_flops

    params = load_params(EMBEDDED)
    _, model = _models(params, 4, 8)
    scales = token_scales(155, 8)
    L, w, V, depth = sum(h * w_ for h, w_ in scales), 256, params.tokenizer.codebook_size, 4
    assert L == 155
    formula = 2 * L * (depth * 12 * w * w + w * V) + depth * 4 * L * L * w
    assert abs(transformer_flops(model, scales) - formula) < 0.05 * formula


def test_schedules_are_written_relative_to_the_latent(folders, tmp_path, capsys):
    """init writes {preset: canonical}, fractions and sizes relative to the training size, so a params file
    whose data.resolution (or ch_mult) is changed afterwards keeps schedules that follow it."""
    out = tmp_path / "p.yaml"
    rc, stdout, err = run(["init", f"imagefolder:{folders['big']}", "--params", str(out), "--rate-gflops", "50"],
                          capsys)
    assert rc == 0, err
    written = yaml.safe_load(out.read_text())
    assert written["sample"]["schedules"] == {"short": {"steps": 4}, "canonical": {"preset": "canonical"},
                                              "long": {"steps": 8}, "large": {"steps": 8, "size": "2x"}}
    assert written["sweep"]["eval_panel"]["uneven"] == {"scales": [0.0, 0.375, 0.625, 1.0]}
    assert written["sweep"]["eval_panel"]["wide"] == {"steps": 4, "size": ["1x", "2x"]}
    assert "canonical {preset: canonical} (1,2,3,4,5,6,8 @ 64x64 px)" in stdout
    assert "large {steps: 8, size: 2x} (1,2,3,5,7,10,13,16 @ 128x128 px)" in stdout
    p = load_params(out)
    assert sides(p, "uneven", panel=True) == [1, 3, 5, 8]
    text = out.read_text().replace("resolution: 64 ", "resolution: 128")      # 16x16 latent: the schedules follow
    (tmp_path / "q.yaml").write_text(text)
    q = load_params(tmp_path / "q.yaml")
    assert q.latent_size == 16
    assert sides(q, "canonical") == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert schedule_size(q, "large") == (256, 256) and sides(q, "uneven", panel=True) == [1, 6, 10, 16]
