"""builtin:glyphs and builtin:icons: their classes told apart by shape, not colour (prepare's determinism: tests/test_prepare.py)."""
from __future__ import annotations

import numpy as np
import pytest

from flexvar.data.synthetic import GLYPHS_CLASSES, ICONS_CLASSES, PALETTE, render_one


def _colours_present(img: np.ndarray) -> np.ndarray:
    """Which palette entries cover >= 4% of the image (nearest palette colour per pixel): colour alone, no shape."""
    d = ((img.reshape(-1, 1, 3).astype(float) - PALETTE[None]) ** 2).sum(-1)
    share = np.bincount(d.argmin(1), minlength=len(PALETTE)) / d.shape[0]
    return (share >= 0.04).astype(float)


def _render(dataset: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    classes, res = {"glyphs": (GLYPHS_CLASSES, 32), "icons": (ICONS_CLASSES, 16)}[dataset]
    labels = np.arange(n) % len(classes)
    imgs = np.stack([np.asarray(render_one(classes[y], res, np.random.default_rng([seed, i]), dataset))
                     for i, y in enumerate(labels)])
    return imgs, labels


@pytest.mark.parametrize("dataset", ["glyphs", "icons"])
def test_classes_are_not_separable_by_colour(dataset):
    """A nearest-centroid classifier on the set of colours an image uses stays near chance (1/8)."""
    train, y_train = _render(dataset, 800, 0)
    val, y_val = _render(dataset, 400, 1)
    f_train = np.stack([_colours_present(im) for im in train])
    f_val = np.stack([_colours_present(im) for im in val])
    assert f_train.sum(1).min() >= 2                         # background and glyph colour both found
    centroids = np.stack([f_train[y_train == c].mean(0) for c in range(8)])
    pred = ((f_val[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y_val).mean() < 0.25


def test_glyph_pairs_share_outline_and_differ_inside():
    """disc / ring / target and square / frame differ only inside the outline: same draw, same silhouette."""
    def mask(cls: str) -> np.ndarray:
        img = np.asarray(render_one(cls, 32, np.random.default_rng([0, 7]), "glyphs")).astype(float)
        return np.abs(img - img[0, 0]).sum(-1) > 60       # differs from the (corner) background

    disc, ring, target = mask("disc"), mask("ring"), mask("target")
    assert ring.sum() < disc.sum() and ring.sum() < target.sum() < disc.sum()
    assert (ring & ~disc).sum() == 0                         # the ring lies inside the disc's outline
    assert (mask("frame") & ~mask("square")).sum() == 0 and mask("frame").sum() < mask("square").sum()


def test_unknown_glyph_class_is_named():
    with pytest.raises(ValueError, match="unknown glyphs class 'hexagon'"):
        render_one("hexagon", 32, np.random.default_rng(0), "glyphs")


def test_icon_ring_and_frame_are_their_filled_shape_with_a_hole():
    """ring / frame: the disc / square of the same draw with background inside (what the mid scales must get)."""
    def mask(cls: str) -> np.ndarray:
        img = np.asarray(render_one(cls, 32, np.random.default_rng([0, 3]), "icons")).astype(float)
        return np.abs(img - img[0, 0]).sum(-1) > 60

    for filled, holed in (("disc", "ring"), ("square", "frame")):
        assert (mask(holed) & ~mask(filled)).sum() == 0 and mask(holed).sum() < 0.85 * mask(filled).sum()
    with pytest.raises(ValueError, match="unknown icons class 'hexagon'"):
        render_one("hexagon", 32, np.random.default_rng(0), "icons")
