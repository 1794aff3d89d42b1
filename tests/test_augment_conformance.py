"""The official augmentation geometry, against crops made by RUNNING the official function.

tests/conformance/make_augment_references.py ran official FlexVAR's RandomHorizontalFlip() +
dataset/augmentation.py random_crop_arr (ADM's, imported from $FLEXVAR_OFFICIAL_DIR) and
center_crop_arr on seeded inputs and committed the crops. Here our flexvar/data/augment.py gets the
same inputs and the same random draws (a random.Random seeded as the official run seeded `random`,
the flip bit the official RandomHorizontalFlip drew) and must give the same pixels, exactly.
Nothing here imports official code.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexvar.data.augment import center_crop, official_view, random_crop, stored_short_side

REFS = np.load(Path(__file__).resolve().parent / "conformance" / "data" / "augment_references.npz")
CASES = [tuple(int(v) for v in c) for c in REFS["cases"]]


def input_image(i: int) -> Image.Image:
    """The generating script's input i (seeded noise), checked against its recorded sha256."""
    w, h = CASES[i][:2]
    img = Image.fromarray(np.random.default_rng(1000 + i).integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert hashlib.sha256(np.asarray(img).tobytes()).digest() == REFS[f"input_sha256_{i}"].tobytes()
    return img


def compare_all() -> dict[str, float]:
    """Our views vs the official crops: (number compared, max abs pixel difference) — also for the report."""
    n, worst = 0, 0
    for i, (_, _, size, seeds) in enumerate(CASES):
        img = input_image(i)
        for s in range(seeds):
            ours = np.asarray(official_view(img, size, random.Random(s), flip=bool(REFS[f"flip_{i}_{s}"])))
            ref = REFS[f"crop_{i}_{s}"]
            assert ours.shape == ref.shape == (size, size, 3), (i, s, ours.shape, ref.shape)
            worst = max(worst, int(np.abs(ours.astype(int) - ref.astype(int)).max()))
            n += 1
        ref = REFS[f"center_{i}"]
        ours = np.asarray(center_crop(img, size))
        assert ours.shape == ref.shape
        worst = max(worst, int(np.abs(ours.astype(int) - ref.astype(int)).max()))
        n += 1
    return {"compared": n, "max_abs_diff": worst}


def test_views_equal_the_official_crops_pixel_for_pixel():
    result = compare_all()
    assert result == {"compared": sum(c[3] for c in CASES) + len(CASES), "max_abs_diff": 0}


@pytest.mark.parametrize("i", range(len(CASES)))
def test_crop_box_lies_in_the_official_range(i):
    """The drawn geometry: short side in [size, ceil(size / 0.88)], every value reached, window inside."""
    size = CASES[i][2]
    shorts = set()
    for s in range(200):
        crop, (short, top, left) = random_crop(input_image(i), size, random.Random(s))
        assert size <= short <= stored_short_side(size, "official") and top >= 0 and left >= 0
        assert crop.size == (size, size)
        shorts.add(short)
    assert len(shorts) > (stored_short_side(size, "official") - size) // 2


def test_stored_short_side_holds_every_official_crop():
    assert stored_short_side(256, "official") == 291 and stored_short_side(256, "center") == 256


if __name__ == "__main__":
    print(compare_all())
