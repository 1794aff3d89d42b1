"""`flexvar generate | refine | inpaint | outpaint | extend`: outputs, and every bad input is one line, exit 2."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tests.tiny_checkpoint import save_tiny_checkpoint

from flexvar.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(d / "img.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / "black.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(d / "white.png")
    (d / "junk.png").write_text("not an image")
    return d


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:      # argparse errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_generate_writes_grid_and_tokens(ckpt, tmp_path, capsys):
    out = tmp_path / "g.png"
    rc, stdout, err = run(["generate", "--checkpoint", str(ckpt), "--class", "1,blue", "--num", "2", "--steps", "4",
                           "--size", "16x32", "--cfg", "2.5", "--top-k", "10", "--seed", "0", "--out", str(out),
                           "--save-tokens", "--precision", "fp32"], capsys)
    assert rc == 0, err
    assert Image.open(out).size[0] > Image.open(out).size[1] > 0
    tok = np.load(tmp_path / "g.tokens.npz")
    assert tok["labels"].tolist() == [1, 1, 2, 2]
    assert tok["step03"].shape == (4, 8, 16) and tok["scales"].tolist()[-1] == [8, 16]


# PIL (width, height) of each edit's grid: the input row over the result row, 2 px apart (16 px input, 8x8 latent)
EDIT_GRID_SIZE = {"refine": (32, 66), "inpaint": (16, 34), "outpaint": (16, 34), "extend": (32, 34)}


@pytest.mark.parametrize("cmd", [["refine", "--size", "32x32"], ["inpaint", "--box", "4,4,12,12"],
                                 ["outpaint", "--mask", "MASK"], ["extend", "--size", "16x32"]])
def test_edits_write_grids(ckpt, files, tmp_path, capsys, cmd):
    import torch

    from flexvar.generation.editing import load_image
    from flexvar.transformer.checkpoint import load_flexvar_with_tokenizer

    name = cmd[0]
    cmd = [str(files / "mask.png") if c == "MASK" else c for c in cmd]
    out = tmp_path / "e.png"
    rc, _, err = run([*cmd, "--checkpoint", str(ckpt), "--image", str(files / "img.png"), "--class", "0",
                      "--steps", "4", "--out", str(out), "--precision", "fp32", "--save-tokens"], capsys)
    assert rc == 0, err
    assert Image.open(out).size == EDIT_GRID_SIZE[name]
    top_row = np.asarray(Image.open(out).convert("RGB"))[:16]
    tokens = np.load(out.with_suffix(".tokens.npz"))
    scales = [tuple(s) for s in tokens["scales"].tolist()]
    _, vq, _ = load_flexvar_with_tokenizer(ckpt, torch.device("cpu"))
    with torch.no_grad():   # the input image's own tokens at its 8x8 latent
        z = vq.encode(load_image(files / "img.png", (16, 16)))
        gt_hw = vq.quantize.nearest(z)[0].numpy()
    keep = np.ones((8, 8), bool)          # latent cells outside the 4..12 px box / mask
    keep[2:6, 2:6] = False
    if name == "inpaint":                 # the box is regenerated, everything else is the input's
        final = tokens[f"step{len(scales) - 1:02d}"][0]
        assert (final[keep] == gt_hw[keep]).all()
        assert (top_row[np.kron(keep, np.ones((2, 2), bool))] == 120).all()   # input shown outside the box
    elif name == "outpaint":              # the mask is kept, the rest regenerated
        final = tokens[f"step{len(scales) - 1:02d}"][0]
        assert (final[~keep] == gt_hw[~keep]).all()
        assert (top_row[np.kron(~keep, np.ones((2, 2), bool))] == 120).all()
    elif name == "extend":                # the input sits in the centre of the 16x32 canvas
        final = tokens[f"step{len(scales) - 1:02d}"][0]
        assert final.shape == (8, 16) and (final[:, 4:12] == gt_hw).all()
        assert (top_row[:, 8:24] == 120).all() and (top_row[:, :8] == 255).all() and (top_row[:, 24:] == 255).all()
    else:                                 # refine: scales up to the image's 8x8 are the input's, then it grows
        assert scales[-1] == (16, 16)
        for k, hw in enumerate(scales):
            if max(hw) <= 8:
                with torch.no_grad():
                    gt_k = vq.quantize.quantize(z, hw)[0][0].numpy()
                assert (tokens[f"step{k:02d}"][0] == gt_k).all(), hw
        assert (top_row == 120).all()


BAD = [
    (["generate", "--size", "abc"], "--size"),
    (["generate", "--size", "0x16"], "--size"),
    (["generate", "--size", "15x16"], "--size"),
    (["generate", "--schedule", "1,a,3"], "--schedule"),
    (["generate", "--schedule", "1,4,2,8"], "--schedule"),
    (["generate", "--schedule", "0,1,8"], "--schedule"),
    (["generate", "--schedule", "1,2,4,8", "--size", "32x32"], "--schedule"),
    (["generate", "--steps", "40"], "--steps"),
    (["generate", "--steps", "0"], "--steps"),
    (["generate", "--steps", "3", "--schedule", "1,2,8"], "--steps"),
    (["generate", "--preset", "999-1"], "--preset"),
    (["generate", "--class", "7"], "--class"),
    (["generate", "--class", "purple"], "--class"),
    (["generate", "--class", "-1"], "--class"),
    (["generate", "--num", "abc"], "--num"),
    (["generate", "--num", "0"], "--num"),
    (["generate", "--top-p", "1.5"], "--top-p"),
    (["generate", "--cfg", "-1"], "--cfg"),
    (["generate", "--cfg-schedule", "cosine"], "--cfg-schedule"),
    (["inpaint", "--image", "IMG"], "--mask"),
    (["inpaint", "--image", "IMG", "--mask", "MISSING"], "--mask"),
    (["inpaint", "--image", "IMG", "--mask", "JUNK"], "--mask"),
    (["inpaint", "--image", "IMG", "--mask", "BLACK"], "--mask"),
    (["inpaint", "--image", "IMG", "--mask", "WHITE"], "--mask"),
    (["inpaint", "--image", "IMG", "--box", "1,2,3"], "--box"),
    (["inpaint", "--image", "IMG", "--box", "4,4,2,12"], "--box"),
    (["outpaint", "--image", "IMG", "--box", "0,0,99,12"], "--box"),
    (["inpaint", "--image", "IMG", "--box", "4,4,12,12", "--size", "32x32"], "--size"),
    (["inpaint", "--image", "MISSING", "--box", "4,4,12,12"], "--image"),
    (["refine", "--image", "JUNK"], "--image"),
    (["refine", "--image", "IMG", "--size", "16x16"], "--size"),
    (["extend", "--image", "IMG", "--size", "8x32"], "--size"),
    (["generate", "--tokenizer", "MISSING"], "--tokenizer"),
]


@pytest.mark.parametrize("argv, arg", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_argument(ckpt, files, capsys, argv, arg):
    names = {"IMG": "img.png", "MISSING": "missing.png", "JUNK": "junk.png", "BLACK": "black.png",
             "WHITE": "white.png"}
    argv = [str(files / names[a]) if a in names else a for a in argv]
    rc, _, err = run([*argv, "--checkpoint", str(ckpt)], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flexvar {argv[0]}: error:") and arg in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("path", ["missing_dir", "FILE"])
def test_missing_checkpoint_is_one_line(tmp_path, capsys, path):
    if path == "FILE":
        (tmp_path / "flexvar.pt").write_text("junk")     # exists, but not a checkpoint
    target = tmp_path / path if path != "FILE" else tmp_path
    rc, _, err = run(["generate", "--checkpoint", str(target)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--checkpoint" in err


def test_module_entry_point_prints_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flexvar.cli", "generate", "--checkpoint", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--checkpoint" in r.stderr and "Traceback" not in r.stderr


# (--num, --size as HxW, grid columns x rows): the written PNG is cols x rows tiles of the asked size,
# 2 white pixels between tiles and none around them
GRID_CASES = [(1, "16x16", 1, 1), (2, "16x16", 2, 1), (1, "16x32", 1, 1), (2, "32x16", 2, 1), (5, "16x16", 3, 2)]


@pytest.mark.parametrize("num, size, cols, rows", GRID_CASES, ids=[f"{n}x{s}" for n, s, _, _ in GRID_CASES])
def test_generate_output_has_the_asked_pixel_size(ckpt, tmp_path, capsys, num, size, cols, rows):
    out = tmp_path / "g.png"
    rc, _, err = run(["generate", "--checkpoint", str(ckpt), "--class", "2", "--num", str(num), "--size", size,
                      "--steps", "3", "--seed", "0", "--out", str(out), "--precision", "fp32"], capsys)
    assert rc == 0, err
    h, w = map(int, size.split("x"))
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (rows * h + 2 * (rows - 1), cols * w + 2 * (cols - 1), 3)
    for c in range(1, cols):        # the gaps between tiles are white
        assert (png[:, c * (w + 2) - 2:c * (w + 2)] == 255).all()
    for r in range(1, rows):
        assert (png[r * (h + 2) - 2:r * (h + 2)] == 255).all()
