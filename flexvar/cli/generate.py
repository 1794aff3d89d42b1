"""`flexvar generate | refine | inpaint | outpaint | extend`: sampling and image-to-image from a checkpoint.

    flexvar generate --checkpoint models/d4 --class 3 --num 8 --steps 6 --size 96x64 --guidance 2.5 \
        --top-k 100 --seed 0 --out grid.png
    flexvar generate --checkpoint models/d4 --class 0,1,2 --schedule 1,2,3,4,6,8 --save-tokens
    flexvar refine   --checkpoint models/d4 --image in.png --class 2 --steps 10 --size 128x128
    flexvar inpaint  --checkpoint models/d4 --image in.png --box 16,16,48,48 --class 2
    flexvar outpaint --checkpoint models/d4 --image in.png --mask keep.png --class 2
    flexvar extend   --checkpoint models/d4 --image in.png --size 64x128 --class 2

Sizes are H x W pixels. Every bad input (size, schedule, class, mask, box, path, a generation
whose memory estimate exceeds --max-memory-gb) is a one-line error naming the argument and exit
code 2 (flexvar.errors.UsageError); argparse errors too. --out is checked before any model is loaded.
The sampling arguments become one `SamplingSettings` (defaults: params.yaml's sample section's), the
object generation takes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pydantic import ValidationError

from flexvar.config import SamplingSettings
from flexvar.errors import one_line_parser_errors as one_line_errors
from flexvar.errors import usage as _usage


def parse_size(text: str | None, arg: str = "--size") -> tuple[int, int] | None:
    """'96x64' -> (96, 64) (H x W); '64' -> (64, 64)."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise _usage(arg, f"{text!r} is not a size; use HxW pixels, e.g. 96x64") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0:
        raise _usage(arg, f"{text!r} is not a size; use HxW with positive sides, e.g. 96x64")
    return vals[0], vals[1]


def parse_schedule(text: str | None) -> list | None:
    """'1,2,3,4,6,8' -> ints (long sides); '1x1,2x3,4x6' -> (h, w) pairs."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise _usage("--schedule", "empty; give scales like 1,2,3,4,6,8 or 1x1,2x3,4x6")
    try:
        if any("x" in s.lower() for s in items):
            return [parse_size(s, "--schedule") for s in items]
        return [int(s) for s in items]
    except ValueError:
        raise _usage("--schedule", f"{text!r}: scales must be ints (1,2,4) or HxW pairs (1x1,2x3)") from None


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4:
        raise _usage("--box", f"{text!r} is not a box; use x0,y0,x1,y1 in pixels")
    return vals


def parse_classes(text: str | None, num: int, meta: dict) -> "torch.Tensor":
    """'3' or '0,1,2' (ids or class names), repeated `num` times each -> labels; None = all classes."""
    import torch

    names, n_classes = list(meta.get("class_names") or []), int(meta["num_classes"])
    if text is None:
        ids = list(range(n_classes))
    else:
        ids = []
        for tok in (t.strip() for t in text.split(",")):
            if tok in names:
                ids.append(names.index(tok))
                continue
            try:
                c = int(tok)
            except ValueError:
                raise _usage("--class", f"{tok!r} is neither a class id nor a class name"
                                        + (f" ({', '.join(names)})" if names else "")) from None
            if not 0 <= c < n_classes:
                raise _usage("--class", f"{c} is out of range; the model has classes 0..{n_classes - 1}")
            ids.append(c)
    return torch.tensor(ids, dtype=torch.int64).repeat_interleave(num)


# --------------------------------------------------------------------------- shared arguments
def _add_common(p: argparse.ArgumentParser, image: bool) -> None:
    one_line_errors(p)
    p.add_argument("--checkpoint", required=True, help="model folder (models/d{depth}) or its flexvar.pt")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the one the checkpoint was trained with, found next to it)")
    p.add_argument("--class", dest="classes", default=None,
                   help="class id(s) or name(s), comma-separated (default: every class)")
    p.add_argument("--num", type=int, default=None, help="images per class (default: 8 for generate, 1 for edits)")
    if image:
        p.add_argument("--image", required=True, help="input image (resized to the training resolution)")
    p.add_argument("--steps", type=int, default=None, help="number of steps (default: the long latent side, at most 10)")
    p.add_argument("--schedule", default=None, help="explicit scales, e.g. 1,2,3,4,6,8 or 1x1,1x2,2x4")
    p.add_argument("--preset", default=None, help="a Tab. 7 preset name, e.g. 256-10")
    p.add_argument("--size", default=None, help="output size HxW in pixels (default: the training resolution)")
    d = SamplingSettings()   # the defaults of params.yaml's sample section
    p.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=d.guidance,
                   help=f"classifier-free guidance scale (0 = off; default {d.guidance})")
    p.add_argument("--guidance-schedule", "--cfg-schedule", dest="guidance_schedule", choices=["ramp", "constant"],
                   default=d.guidance_schedule,
                   help="ramp: guidance * k / min(n-1, 9) at step k (paper); constant: guidance at every step")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"top-k sampling (0 = off, 1 = greedy; default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help="top-p (nucleus) sampling (0 = off)")
    p.add_argument("--greedy-rule", choices=["official", "outside", "none"], default=d.greedy_rule,
                   help="official: greedy at scales outside FlexVAR's sampled list and above the training size; "
                        "outside: greedy only above the training size; none: never (default: as sample.greedy_rule)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision, help="autocast precision")
    p.add_argument("--out", default=None, help="output grid image (.png, .jpg, ...)")
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="refuse a generation whose estimated peak memory is above this (default: "
                        "sample.max_memory_gb's default, 16)")
    p.add_argument("--save-tokens", action="store_true", help="also write every step's token maps to OUT.tokens.npz")


def _check_numbers(args) -> None:
    if args.num is not None and args.num < 1:
        raise _usage("--num", f"{args.num} must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise _usage("--steps", f"{args.steps} must be at least 1")
    sampling(args)
    if args.batch_size < 1:
        raise _usage("--batch-size", f"{args.batch_size} must be at least 1")
    if sum(x is not None for x in (args.steps, args.schedule, args.preset)) > 1:
        raise _usage("--steps", "give at most one of --steps, --schedule, --preset")
    if args.max_memory_gb is not None and args.max_memory_gb <= 0:
        raise _usage("--max-memory-gb", f"{args.max_memory_gb} must be > 0")


def _out_path(args, default_name: str) -> Path:
    """--out (or the command's default), checked before any work: a writable image file path."""
    from flexvar.outputs import IMAGE_SUFFIXES, check_out_file

    out = check_out_file(args.out or default_name, "--out", IMAGE_SUFFIXES)
    if args.save_tokens:
        check_out_file(out.with_suffix(".tokens.npz"), "--out")
    return out


def _check_memory(args, model, vqvae, scales, num_images: int) -> None:
    """Refuse (before allocating) a generation whose estimated peak is above --max-memory-gb."""
    from flexvar.generation.memory import DEFAULT_MAX_MEMORY_GB, check_generation_memory

    arg = "--schedule" if args.schedule else "--size" if args.size else "--steps"
    limit = args.max_memory_gb or DEFAULT_MAX_MEMORY_GB
    check_generation_memory(model, vqvae, scales, min(args.batch_size, num_images), args.guidance > 0, limit,
                            what=f"{arg} with --batch-size {args.batch_size}", setting="--max-memory-gb",
                            num_images=num_images)


def _load(args):
    """(model, vqvae, meta, device); missing or unusable checkpoints are --checkpoint errors."""
    from flexvar.checkpoint import CheckpointError
    from flexvar.device import pick_device
    from flexvar.transformer.checkpoint import flexvar_path, load_flexvar_with_tokenizer

    if not flexvar_path(args.checkpoint).is_file():
        raise _usage("--checkpoint", f"{args.checkpoint} has no flexvar.pt (train one: dvc repro train_transformer, "
                                     f"or flexvar import-official)")
    try:
        device = pick_device(args.device)
    except RuntimeError as e:
        raise _usage("--device", str(e)) from None
    try:
        model, vqvae, meta = load_flexvar_with_tokenizer(args.checkpoint, device, args.tokenizer)
    except CheckpointError as e:
        raise _usage("--tokenizer" if args.tokenizer and "tokenizer" in str(e) else "--checkpoint", str(e)) from None
    return model, vqvae, meta, device


def _schedule(args, meta, size_hw=None, default_steps=None):
    from flexvar.schedules import ScheduleError, resolve_schedule

    size_hw = size_hw if size_hw is not None else parse_size(args.size)
    scales = parse_schedule(args.schedule)
    f, train_hw = int(meta["downsample"]), tuple(meta["latent_hw"])
    steps = args.steps
    if steps is None and scales is None and args.preset is None:
        long_side = max(size_hw) // f if size_hw else max(train_hw)
        steps = default_steps or min(10, max(1, long_side))
    arg = "--schedule" if scales is not None else "--preset" if args.preset else "--steps"
    if size_hw is not None and (size_hw[0] % f or size_hw[1] % f):
        raise _usage("--size", f"{size_hw[0]}x{size_hw[1]} must be multiples of the tokenizer's downsampling {f}")
    try:
        return resolve_schedule(steps=steps, scales=scales, preset=args.preset, size_hw=size_hw,
                                train_latent_hw=train_hw, downsample=f)
    except ScheduleError as e:
        raise _usage(arg, str(e)) from None


SAMPLING_ARGS = {"guidance": "--guidance", "guidance_schedule": "--guidance-schedule", "top_k": "--top-k",
                 "top_p": "--top-p", "greedy_rule": "--greedy-rule", "precision": "--precision"}


def sampling(args) -> SamplingSettings:
    """The sampling arguments as the one settings object generation takes; a bad value names its argument."""
    try:
        return SamplingSettings(**{k: getattr(args, k) for k in SAMPLING_ARGS})
    except ValidationError as e:
        err = e.errors()[0]
        raise _usage(SAMPLING_ARGS[err["loc"][0]], f"{err['input']!r}: {err['msg']}") from None


def _gen_kwargs(args, meta) -> dict:
    """What `generate` and the edits take: the sampling settings and this run's batch, seed, trained size."""
    return dict(sampling=sampling(args), train_side=max(meta["latent_hw"]), batch_size=args.batch_size,
                seed=args.seed, progress=True)


def _write(args, result, default_name: str, extra_rows=None) -> Path:
    """Grid PNG (optional input rows first) and, with --save-tokens, the token maps as .npz."""
    import torch

    from flexvar.data.splits import to_uint8
    from flexvar.generation.generate import grid_columns
    from flexvar.grid import image_grid

    out = _out_path(args, default_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    imgs = to_uint8(result.images)
    ncol = len(imgs) if extra_rows is not None else grid_columns(len(imgs))
    if extra_rows is not None:
        imgs = torch.cat([extra_rows, imgs])
    image_grid(imgs, ncol=min(ncol, 16)).save(out)
    print(f"wrote {out} ({len(result.images)} images, {result.images.shape[-2]}x{result.images.shape[-1]} px, "
          f"scales {' '.join(f'{h}x{w}' for h, w in result.scales)})")
    if args.save_tokens:
        tok = out.with_suffix(".tokens.npz")
        np.savez(tok, labels=result.labels.numpy(), scales=np.array(result.scales, dtype=np.int64),
                 **{f"step{k:02d}": t.numpy() for k, t in enumerate(result.tokens)})
        print(f"wrote {tok}")
    return out


# --------------------------------------------------------------------------- generate
def add_generate(p: argparse.ArgumentParser) -> None:
    _add_common(p, image=False)


def run_generate(args) -> int:
    from flexvar.generation.generate import generate

    _check_numbers(args)
    parse_size(args.size)
    parse_schedule(args.schedule)
    _out_path(args, "generate.png")
    model, vqvae, meta, _ = _load(args)
    scales = _schedule(args, meta)
    labels = parse_classes(args.classes, args.num or 8, meta)
    _check_memory(args, model, vqvae, scales, len(labels))
    result = generate(model, vqvae, labels, scales, **_gen_kwargs(args, meta))
    _write(args, result, "generate.png")
    return 0


# --------------------------------------------------------------------------- edits
def _edit_inputs(args):
    """Checks, model, input image at the training resolution, labels."""
    from flexvar.generation.editing import EditError, load_image

    _check_numbers(args)
    parse_size(args.size)
    parse_schedule(args.schedule)
    _out_path(args, f"{args.cmd_name}.png")
    if Path(args.image).is_dir():
        raise _usage("--image", f"{args.image} is a folder; give an image file")
    if not Path(args.image).is_file():
        raise _usage("--image", f"{args.image} does not exist")
    model, vqvae, meta, _ = _load(args)
    if model.cfg.prediction != "gt":
        raise _usage("--checkpoint", "image-to-image needs a ground-truth (FlexVAR) model; this one predicts "
                                     "VAR residuals")
    train_px = tuple(meta["resolution"])
    try:
        image = load_image(args.image, train_px)
    except (FileNotFoundError, EditError) as e:
        raise _usage("--image", str(e)) from None
    labels = parse_classes(args.classes, args.num or 1, meta)
    return model, vqvae, meta, image.expand(len(labels), -1, -1, -1), labels, train_px


def add_refine(p: argparse.ArgumentParser) -> None:
    _add_common(p, image=True)


def run_refine(args) -> int:
    from flexvar.data.splits import to_uint8
    from flexvar.generation.editing import refine

    args.cmd_name = "refine"
    model, vqvae, meta, image, labels, train_px = _edit_inputs(args)
    size = parse_size(args.size) or (2 * train_px[0], 2 * train_px[1])
    scales = _schedule(args, meta, size_hw=size)
    _check_memory(args, model, vqvae, scales, len(labels))
    try:
        result = refine(model, vqvae, image, labels, scales, **_gen_kwargs(args, meta))
    except ValueError as e:
        raise _usage("--size", str(e)) from None
    import torch.nn.functional as F
    shown = F.interpolate(image[:1], size=result.images.shape[-2:], mode="nearest")
    _write(args, result, "refine.png", extra_rows=to_uint8(shown))
    return 0


def _add_mask_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--mask", help=f"PNG mask, white = {what} (resized to the image)")
    g.add_argument("--box", help=f"pixel box x0,y0,x1,y1 to {what}")


def _mask(args, size_hw):
    from flexvar.generation.editing import MaskError, box_mask, check_mask, load_mask

    arg = "--mask" if args.mask is not None else "--box"
    try:
        if args.mask is not None:
            if Path(args.mask).is_dir():
                raise MaskError(f"{args.mask} is a folder; give a mask image file")
            if not Path(args.mask).is_file():
                raise MaskError(f"{args.mask} does not exist")
            m = load_mask(args.mask, size_hw)
        else:
            m = box_mask(parse_box(args.box), size_hw)
        return check_mask(m)
    except MaskError as e:
        raise _usage(arg, str(e)) from None


def add_inpaint(p: argparse.ArgumentParser) -> None:
    _add_common(p, image=True)
    _add_mask_args(p, "generate")


def add_outpaint(p: argparse.ArgumentParser) -> None:
    _add_common(p, image=True)
    _add_mask_args(p, "keep")


def _run_paint(args, keep: bool) -> int:
    from flexvar.data.splits import to_uint8
    from flexvar.generation.editing import MaskError, inpaint, mask_overlay

    if args.size is not None:
        raise _usage("--size", f"{args.cmd_name} works at the image's (training) size; use extend or refine to grow it")
    model, vqvae, meta, image, labels, train_px = _edit_inputs(args)
    m = _mask(args, train_px)
    hole = ~m if keep else m
    scales = _schedule(args, meta, size_hw=train_px)
    _check_memory(args, model, vqvae, scales, len(labels))
    try:
        result = inpaint(model, vqvae, image, hole, labels, scales, **_gen_kwargs(args, meta))
    except MaskError as e:
        raise _usage("--mask" if args.mask else "--box", str(e)) from None
    _write(args, result, f"{args.cmd_name}.png", extra_rows=mask_overlay(to_uint8(image[:1]), hole))
    return 0


def run_inpaint(args) -> int:
    args.cmd_name = "inpaint"
    return _run_paint(args, keep=False)


def run_outpaint(args) -> int:
    args.cmd_name = "outpaint"
    return _run_paint(args, keep=True)


def add_extend(p: argparse.ArgumentParser) -> None:
    _add_common(p, image=True)
    p.set_defaults(size=None)


def run_extend(args) -> int:
    from flexvar.data.splits import to_uint8
    from flexvar.generation.editing import extend, pad_center

    args.cmd_name = "extend"
    model, vqvae, meta, image, labels, train_px = _edit_inputs(args)
    size = parse_size(args.size) or (train_px[0], 2 * train_px[1])
    if size[0] < train_px[0] or size[1] < train_px[1] or size == train_px:
        raise _usage("--size", f"{size[0]}x{size[1]} must contain the {train_px[0]}x{train_px[1]} image and be larger")
    scales = _schedule(args, meta, size_hw=size)
    _check_memory(args, model, vqvae, scales, len(labels))
    result = extend(model, vqvae, image, labels, scales, **_gen_kwargs(args, meta))
    _write(args, result, "extend.png", extra_rows=pad_center(to_uint8(image[:1]), size))
    return 0


COMMANDS = {
    "generate": ("class-conditional generation: any steps, size, aspect ratio", add_generate, run_generate),
    "refine": ("re-synthesise an image at a larger size (teacher-forced coarse scales)", add_refine, run_refine),
    "inpaint": ("regenerate a masked region of an image", add_inpaint, run_inpaint),
    "outpaint": ("keep a masked region of an image, regenerate the rest", add_outpaint, run_outpaint),
    "extend": ("extend an image to a wider/taller canvas (e.g. 1:2)", add_extend, run_extend),
}
