"""The built-in datasets (shapes, glyphs, icons): class-labelled synthetic images with structure at every scale.

`builtin:shapes` needs no download and is generated deterministically from the seed in
seconds. Each class is a distinct kind of picture — a shape, a texture or a layout — drawn
with random position, size, colours and a random two-colour gradient background, so that
a generator has to get coarse layout (scale 1-2), object outline (mid scales) and texture or
edges (last scales) right, and FID differences between models mean something.

    >>> imgs, labels = render_shapes(n=4, resolution=32, seed=0)
    >>> len(imgs), imgs[0].size, labels[:2]
    (4, (32, 32), [0, 1])
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES_CLASSES = ["disc", "square", "triangle", "ring", "cross", "stripes", "checker", "two_discs"]
# builtin:glyphs: one flat-coloured glyph from a small palette on a softly shaded palette background.
# Pairs of classes share their outline and differ inside it (disc / ring / target, square / frame), so
# coarse scales fix position and colour, mid scales the outline, fine scales the holes and the dot.
GLYPHS_CLASSES = ["disc", "ring", "target", "square", "frame", "triangle", "plus", "bars"]
# builtin:icons: one large, bold, upright icon in a flat palette colour on a flat palette background.
# The classes differ in their layout at the mid scales (a hole, a bar, a corner, two blobs), so a small
# model trained for minutes can make them recognisable; edges and corners still need the fine scales.
ICONS_CLASSES = ["disc", "ring", "square", "frame", "triangle", "plus", "bars", "two_dots"]
BUILTIN = {"shapes": SHAPES_CLASSES, "glyphs": GLYPHS_CLASSES, "icons": ICONS_CLASSES}
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges
GLYPHS_SUPERSAMPLE = 4
PALETTE = np.array([[230, 57, 70], [244, 162, 97], [233, 216, 96], [42, 157, 143], [69, 123, 157],
                    [29, 53, 87], [241, 250, 238], [38, 38, 38], [155, 93, 229]], dtype=float)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _contrasting(rng: np.random.Generator, ref: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background's mean that the object stays visible."""
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if np.abs(c - ref).sum() > 180:
            break
    return tuple(int(v) for v in c)


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """A linear two-colour gradient at a random angle."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)) / math.sqrt(0.5) * 0.5 + 0.5
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)), (c0 + c1) / 2


def _draw(cls: str, draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, fg, fg2) -> None:
    """Draw one instance of class `cls` on an s x s canvas."""
    r = rng.uniform(0.18, 0.38) * s                     # object radius
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if cls == "disc":
        draw.ellipse(box, fill=fg)
    elif cls == "square":
        a = rng.uniform(0, math.pi / 2)
        pts = [(cx + r * math.cos(a + k * math.pi / 2), cy + r * math.sin(a + k * math.pi / 2)) for k in range(4)]
        draw.polygon(pts, fill=fg)
    elif cls == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=fg)
    elif cls == "ring":
        draw.ellipse(box, outline=fg, width=max(2, int(r * rng.uniform(0.2, 0.35))))
    elif cls == "cross":
        w = r * rng.uniform(0.25, 0.4)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif cls == "stripes":
        period = s * rng.uniform(0.08, 0.16)
        vertical = rng.random() < 0.5
        for k in range(int(s / period) + 2):
            o = k * period
            rect = [o, 0, o + period / 2, s] if vertical else [0, o, s, o + period / 2]
            draw.rectangle(rect, fill=fg)
    elif cls == "checker":
        cell = s * rng.uniform(0.12, 0.22)
        n = int(s / cell) + 1
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell, (j + 1) * cell], fill=fg)
    elif cls == "two_discs":
        rr = r * 0.5
        a = rng.uniform(0, 2 * math.pi)
        d = r - rr
        for sign, col in ((1, fg), (-1, fg2)):
            x, y = cx + sign * d * math.cos(a), cy + sign * d * math.sin(a)
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=col)
    else:
        raise ValueError(f"unknown shapes class {cls!r}")


def _glyph_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and glyph colour: two palette entries far enough apart to keep the glyph visible."""
    while True:
        b, g = rng.choice(len(PALETTE), 2, replace=False)
        if np.abs(PALETTE[b] - PALETTE[g]).sum() > 150:
            return PALETTE[b], PALETTE[g]


def _shaded(colour: np.ndarray, rng: np.random.Generator, s: int) -> Image.Image:
    """A flat colour with a soft linear shading (+-12% brightness) at a random angle."""
    angle, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.12)
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1) - 0.5
    gain = 1 + amp * 2 * (xx * math.cos(angle) + yy * math.sin(angle))
    return Image.fromarray((colour[None, None] * gain[..., None]).clip(0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, r: float, n: int, a: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a + k * 2 * math.pi / n), cy + r * math.sin(a + k * 2 * math.pi / n)) for k in range(n)]


def _draw_glyph(cls: str, draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, fg, bg) -> None:
    """One glyph of class `cls` on an s x s canvas: size 40-76% of the image, random place and turn."""
    r = rng.uniform(0.2, 0.38) * s
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    a = rng.uniform(0, 2 * math.pi)
    box = [cx - r, cy - r, cx + r, cy + r]
    if cls in ("disc", "ring", "target"):
        draw.ellipse(box, fill=fg)
        if cls != "disc":
            hole = r * rng.uniform(0.5, 0.62)
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=bg)
        if cls == "target":
            dot = r * rng.uniform(0.2, 0.28)
            draw.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], fill=fg)
    elif cls in ("square", "frame"):
        draw.polygon(_polygon(cx, cy, r, 4, a), fill=fg)
        if cls == "frame":
            draw.polygon(_polygon(cx, cy, r * rng.uniform(0.5, 0.62), 4, a), fill=bg)
    elif cls == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, a), fill=fg)
    elif cls == "plus":
        w = r * rng.uniform(0.28, 0.38)
        for arm in (0.0, math.pi / 2):
            c, sn = math.cos(a + arm), math.sin(a + arm)
            draw.polygon([(cx + u * r * c - v * w * sn, cy + u * r * sn + v * w * c)
                          for u, v in ((-1, -1), (1, -1), (1, 1), (-1, 1))], fill=fg)
    elif cls == "bars":
        w = r * rng.uniform(0.18, 0.22)                   # three bars, gaps as wide as the bars' half-width
        c, sn = math.cos(a), math.sin(a)
        for off in (-3.2 * w, 0.0, 3.2 * w):
            draw.polygon([(cx + u * r * c - (off + v * w) * sn, cy + u * r * sn + (off + v * w) * c)
                          for u, v in ((-1, -1), (1, -1), (1, 1), (-1, 1))], fill=fg)
    else:
        raise ValueError(f"unknown glyphs class {cls!r}")


def render_glyph(cls: str, resolution: int, rng: np.random.Generator) -> Image.Image:
    """One builtin:glyphs image: flat palette glyph on a softly shaded palette background, anti-aliased."""
    s = resolution * GLYPHS_SUPERSAMPLE
    bg, fg = _glyph_colours(rng)
    img = _shaded(bg, rng, s)
    _draw_glyph(cls, ImageDraw.Draw(img), rng, s, tuple(int(v) for v in fg), tuple(int(v) for v in bg))
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def _draw_icon(cls: str, draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, fg, bg) -> None:
    """One icon of class `cls` on an s x s canvas: 60-84% of the image wide, upright, at a random place."""
    r = rng.uniform(0.30, 0.42) * s
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    hole = r * rng.uniform(0.45, 0.55)
    if cls in ("disc", "ring"):
        draw.ellipse(box, fill=fg)
        if cls == "ring":
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=bg)
    elif cls in ("square", "frame"):
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fg)
        if cls == "frame":
            draw.rectangle([cx - hole, cy - hole, cx + hole, cy + hole], fill=bg)
    elif cls == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fg)
    elif cls == "plus":
        w = r * rng.uniform(0.3, 0.38)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif cls == "bars":                                   # two horizontal bars, the gap as wide as a bar
        w = r * rng.uniform(0.28, 0.34)
        for off in (-1.5 * w, 1.5 * w):
            draw.rectangle([cx - r, cy + off - w, cx + r, cy + off + w], fill=fg)
    elif cls == "two_dots":                               # two discs side by side
        d = r * 0.5
        for x in (cx - d, cx + d):
            draw.ellipse([x - d * 0.95, cy - d * 0.95, x + d * 0.95, cy + d * 0.95], fill=fg)
    else:
        raise ValueError(f"unknown icons class {cls!r}")


def render_icon(cls: str, resolution: int, rng: np.random.Generator) -> Image.Image:
    """One builtin:icons image: a flat palette icon on a flat palette background, anti-aliased."""
    s = resolution * GLYPHS_SUPERSAMPLE
    bg, fg = _glyph_colours(rng)
    img = Image.new("RGB", (s, s), tuple(int(v) for v in bg))
    _draw_icon(cls, ImageDraw.Draw(img), rng, s, tuple(int(v) for v in fg), tuple(int(v) for v in bg))
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def render_one(cls: str, resolution: int, rng: np.random.Generator, dataset: str = "shapes") -> Image.Image:
    """One image of class `cls` of builtin dataset `dataset`, drawn from `rng`."""
    if dataset == "glyphs":
        return render_glyph(cls, resolution, rng)
    if dataset == "icons":
        return render_icon(cls, resolution, rng)
    s = resolution * SUPERSAMPLE
    img, bg_mean = _background(rng, s)
    fg = _contrasting(rng, bg_mean)
    fg2 = _contrasting(rng, np.asarray(fg, dtype=float))
    _draw(cls, ImageDraw.Draw(img), rng, s, fg, fg2)
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def render_shapes(n: int, resolution: int, seed: int, classes: list[str] = SHAPES_CLASSES,
                  dataset: str = "shapes") -> tuple[list[Image.Image], list[int]]:
    """n images cycling through the classes (balanced), each from its own seeded RNG stream."""
    images, labels = [], []
    for i in range(n):
        label = i % len(classes)
        rng = np.random.default_rng([seed, i])
        images.append(render_one(classes[label], resolution, rng, dataset))
        labels.append(label)
    return images, labels
