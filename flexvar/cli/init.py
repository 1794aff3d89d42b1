"""`flexvar init imagefolder:<dir>`: params.yaml sized to an image folder, with a run-time estimate.

    flexvar init imagefolder:data/mine                      cpu budget, 30 minutes
    flexvar init imagefolder:data/mine --resolution 64 --budget gpu --minutes 240

The folder is the layout `prepare` reads (<dir>/train/<class>/*.png|jpg|..., optional <dir>/val/).
Every file is opened once, in turn (header, then a reduced decode that finds truncated files), so
memory does not grow with the folder; what is kept is counts, a histogram of short sides and a few
bad file names (one class folder's file list at a time). The choices, each printed with its reason:

  data.resolution       the largest of 16, 32, 64, ... at most the images' median short side, capped
                        by the budget (cpu 64, gpu 256), unless --resolution is given
  tokenizer.ch_mult     downsampling f (2**(len-1)) so the latent side is the budget's (cpu 8, gpu 16)
  tokenizer.codebook_size  a power of two (256 .. 1024 on cpu, 4096 / 8912 on gpu) with ~64 training
                        tokens per code
  sample/sweep schedules   relative to the latent ({preset: canonical}, fractions, size 2x), step counts
                        sized to the latent side (`write_schedules`)
  sample.per_class      ~512 samples per variant (cpu), the paper's 50 per class (gpu)
  sample.top_k          0 (the full distribution): the embedded default's top-k 10 is tuned to its icons
                        and costs real data its variety (MNIST at 32 px, d4 canonical: recall 0.59 at
                        top-k 10, 0.83 at 0, class accuracy 0.98 vs 0.95; docs/own_data/README.md)
  evaluate.feature_net_steps  ~20 epochs of the training images, 300 .. 3000
  train_*.steps         what fits --minutes after everything else (flexvar/estimate.py's cost model),
                        35% tokenizer, 65% transformers

Everything else is the embedded default params.yaml, comments kept (ruamel round-trip); the result is
validated by flexvar.config before it is written (atomically).
"""
from __future__ import annotations

import argparse
import io
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexvar.errors import one_line_parser_errors, usage

RESOLUTIONS = (16, 32, 64, 128, 256, 512)
BUDGETS = {   # max resolution, latent side, default minutes
    "cpu": {"max_resolution": 64, "latent": 8, "minutes": 30},
    "gpu": {"max_resolution": 256, "latent": 16, "minutes": 600},
}
CH_MULT = {1: [1], 2: [1, 2], 3: [1, 2, 2], 4: [1, 1, 2, 2], 5: [1, 1, 2, 2, 4], 6: [1, 1, 2, 2, 4, 4]}
TOKENS_PER_CODE = 64
TOKENIZER_SHARE = 0.35
MIN_STEPS = 100
MAX_EPOCHS = 200      # steps are capped at this many passes over the training images (tiny data, big budget)
BAD_NAMES_KEPT = 3


# --------------------------------------------------------------------------- the folder
@dataclass
class FolderStats:
    root: Path
    classes: list[str]
    counts: dict[str, Counter] = field(default_factory=dict)   # split -> class -> good images
    short_sides: Counter = field(default_factory=Counter)      # short side (px) -> images
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    other_files: int = 0
    seconds: float = 0.0

    @property
    def train(self) -> int:
        return sum(self.counts.get("train", Counter()).values())

    @property
    def val(self) -> int:
        return sum(self.counts.get("val", Counter()).values())

    def median_short_side(self) -> int:
        return int(statistics.median_low(self.short_sides.elements()))


def scan_folder(source: str) -> FolderStats:
    """Stream every file of an imagefolder source once; bad files are counted, not raised."""
    from PIL import Image

    from flexvar.data.prepare import IMAGE_EXTS

    kind, _, path = source.partition(":")
    if kind != "imagefolder" or not path:
        raise usage("SOURCE", f"{source!r}: give imagefolder:<dir> (a folder of <dir>/train/<class>/ images)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise usage("SOURCE", f"{root} does not exist or is not a folder")
    train = root / "train"
    if not train.is_dir():
        raise usage("SOURCE", f"{root} has no train/ folder (expected {root}/train/<class>/*.png)")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    if not classes:
        raise usage("SOURCE", f"{train} has no class folders (expected {train}/<class>/*.png)")
    stats, t0 = FolderStats(root, classes), time.perf_counter()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            continue
        counts = stats.counts.setdefault(split, Counter())
        for c in classes:
            for file in sorted((root / split / c).rglob("*")) if (root / split / c).is_dir() else []:
                if not file.is_file():
                    continue
                if file.suffix.lower() not in IMAGE_EXTS:
                    stats.other_files += 1
                    continue
                try:
                    with Image.open(file) as img:
                        size = img.size
                        img.draft("RGB", (64, 64))   # JPEG: decode at a reduced scale, still reads every byte
                        img.load()
                except Exception as e:   # PIL raises many types for bad files
                    stats.bad += 1
                    if len(stats.bad_examples) < BAD_NAMES_KEPT:
                        stats.bad_examples.append(f"{file.relative_to(root)} ({type(e).__name__})")
                    continue
                counts[c] += 1
                stats.short_sides[min(size)] += 1
    stats.seconds = time.perf_counter() - t0
    if stats.train == 0:
        raise usage("SOURCE", f"no readable images under {train}/<class>/ ({stats.bad} bad, {stats.other_files} "
                              f"other files); image types: {', '.join(sorted(IMAGE_EXTS))}")
    return stats


# --------------------------------------------------------------------------- the choices
def choose_resolution(stats: FolderStats, budget: str) -> tuple[int, str]:
    med, cap = stats.median_short_side(), BUDGETS[budget]["max_resolution"]
    fits = [r for r in RESOLUTIONS if r <= min(med, cap)] or [RESOLUTIONS[0]]
    why = f"median short side {med} px" + (f"; at most {cap} for the {budget} budget" if med > cap else "")
    return fits[-1], why


def choose_downsampling(resolution: int, budget: str) -> tuple[int, str]:
    """The largest power of two f dividing the resolution with a latent side of at least the budget's."""
    target, f = BUDGETS[budget]["latent"], 2   # at least one downsampling (the embedded default's 2)
    while resolution % (2 * f) == 0 and resolution // (2 * f) >= target and 2 * f <= 2 ** (max(CH_MULT) - 1):
        f *= 2
    return f, f"downsampling {f}: {resolution} px -> {resolution // f}x{resolution // f} latent ({budget} budget: " \
              f"latent side {target})"


def choose_codebook(train_images: int, latent: int, budget: str) -> tuple[int, str]:
    tokens = train_images * latent * latent
    if budget == "gpu":
        size = 8912 if train_images >= 100_000 else 4096
        return size, f"{tokens:,} training tokens ({'the paper' if size == 8912 else 'half the paper'}'s codebook)"
    size = 1024
    while size > 256 and tokens / size < TOKENS_PER_CODE:
        size //= 2
    return size, f"{tokens:,} training tokens: ~{tokens // size} per code ({TOKENS_PER_CODE} wanted, " \
                 f"codebook 256 .. 1024)"


UNEVEN = [0.0, 0.375, 0.625, 1.0]   # the sweep's non-canonical scale list, fractions of the latent (n=8: 1,3,5,8)


def write_schedules(doc: Any, latent: int) -> dict[str, Any]:
    """The schedules of sample.schedules and sweep.eval_panel, written relative to the latent so that they
    follow data.resolution and tokenizer.ch_mult: canonical = {preset: canonical} (VAR's scales below n,
    then n); short ~0.6x and long ~1.3x its steps (step counts, sized to the latent side n chosen here);
    large = long's steps at size 2x; the sweep's uneven fractions UNEVEN and wide = short's steps at
    [1x, 2x] (1:2 aspect). The one place `init` writes schedules."""
    from flexvar.schedules import canonical_sides

    canonical = canonical_sides(latent)
    short = max(2, round(0.6 * len(canonical)))
    long = min(latent, math.ceil(1.3 * len(canonical)))
    sample = {"short": {"steps": short}, "canonical": {"preset": "canonical"}, "long": {"steps": long},
              "large": {"steps": long, "size": "2x"}}
    panel = {**sample, "uneven": {"scales": UNEVEN}, "wide": {"steps": min(latent, short), "size": ["1x", "2x"]}}
    for section, schedules in (("sample", sample), ("sweep", panel)):
        target = doc[section]["schedules" if section == "sample" else "eval_panel"]
        for name, spec in schedules.items():
            target[name] = _flow(spec)
    return sample


def _flow(spec: dict) -> Any:
    """A schedule written in flow style ({steps: 4}), like the embedded params.yaml."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    out = CommentedMap()
    for k, v in spec.items():
        if isinstance(v, list):
            v = CommentedSeq(v)
            v.fa.set_flow_style()
        out[k] = v
    out.fa.set_flow_style()
    return out


def fit_steps(params, counts, rates, minutes: float) -> tuple[int, int, float]:
    """(tokenizer steps, transformer steps, seconds of everything else) that fill `minutes`, each at
    least MIN_STEPS and at most MAX_EPOCHS passes over the training images."""
    from flexvar.estimate import compute_seconds, estimate

    one = params.model_copy(deep=True)
    one.train_tokenizer.steps, one.train_transformer.steps = 1, 1
    costs = estimate(one, counts, rates)
    tok = sum(compute_seconds(c, rates) for c in costs if c.stage == "train_tokenizer")
    tf = sum(compute_seconds(c, rates) for c in costs if c.stage.startswith("train_transformer"))
    rest = sum(c.seconds for c in costs) - tok - tf
    left = max(0.0, minutes * 60 - rest)
    steps = []
    for share, per_step, batch in ((TOKENIZER_SHARE, tok, params.train_tokenizer.batch_size),
                                   (1 - TOKENIZER_SHARE, tf, params.train_transformer.batch_size)):
        cap = max(MIN_STEPS, math.ceil(MAX_EPOCHS * counts.train / batch))
        steps.append(min(cap, max(MIN_STEPS, int(share * left / per_step) // 10 * 10)))
    return steps[0], steps[1], rest


# --------------------------------------------------------------------------- the command
def _add_init(p: argparse.ArgumentParser) -> None:
    one_line_parser_errors(p)
    p.add_argument("source", metavar="SOURCE", help="imagefolder:<dir> (<dir>/train/<class>/*.png, optional val/)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: from the images)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="cpu (default) or gpu")
    p.add_argument("--minutes", type=float, default=None,
                   help="time for the whole dvc repro (default: 30 for cpu, 600 for gpu)")
    p.add_argument("--params", default="params.yaml", help="params file to write (default: params.yaml)")
    p.add_argument("--rate-gflops", default=None,
                   help="compute rate for the estimate, GFLOP/s: one number, or TOKENIZER,TRANSFORMER (default: "
                        "measured on this machine, or assumed for a gpu budget without a GPU)")


def _run_init(args: argparse.Namespace) -> int:
    from flexvar.config import load_params_dict
    from flexvar.estimate import DataCounts, estimate, format_estimate, rates_for
    from flexvar.presets import PRESETS_DIR, _load_yaml, _plain, _yaml

    if args.resolution is not None and (args.resolution < 8 or args.resolution % 2):
        raise usage("--resolution", f"{args.resolution} must be an even number of pixels, at least 8")
    if args.minutes is not None and args.minutes <= 0:
        raise usage("--minutes", f"{args.minutes} must be > 0")
    check_rates(args.rate_gflops)
    out = Path(args.params)
    if out.is_dir():
        raise usage("--params", f"{out} is a folder; give the params file to write")
    stats = scan_folder(args.source)
    budget, minutes = args.budget, args.minutes or BUDGETS[args.budget]["minutes"]
    lines: list[tuple[str, Any, str]] = []   # (key, value, why)

    res, why = (args.resolution, "--resolution") if args.resolution else choose_resolution(stats, budget)
    lines.append(("data.resolution", res, why))
    small = sum(n for side, n in stats.short_sides.items() if side < res)
    lines.append(("data.upscale_small", small > 0, f"{small} images have a short side under {res} px"
                  + (" (upscaled, not skipped)" if small else "")))
    f, why = choose_downsampling(res, budget)
    ch_mult = CH_MULT[int(math.log2(f)) + 1]
    lines.append(("tokenizer.ch_mult", ch_mult, why))
    latent = res // f
    book, why = choose_codebook(stats.train, latent, budget)
    lines.append(("tokenizer.codebook_size", book, why))
    classes = len(stats.classes)
    per_class = 50 if budget == "gpu" else min(64, max(8, math.ceil(512 / classes)))
    lines.append(("sample.per_class", per_class, f"{per_class * classes} samples per variant"
                  + (" (the paper's 50 per class)" if budget == "gpu"
                     else " (~512 wanted for FID and accuracy intervals; 8 .. 64 per class)")))
    lines.append(("sample.top_k", 0, "the full distribution: samples keep the data's variety (top-k 10 is"
                  " the embedded default's, tuned to its icons)"))
    fnet = min(3000, max(300, math.ceil(20 * stats.train / 64)))
    lines.append(("evaluate.feature_net_steps", fnet, f"~20 epochs of {stats.train} training images at batch 64"))

    y = _yaml()
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = _load_yaml(y, PRESETS_DIR.parent / "params.yaml")
    doc["data"]["source"] = f"imagefolder:{stats.root}"
    for key, value, why in lines:
        _set(doc, key, value, why)
    sample = write_schedules(doc, latent)
    params = load_params_dict(_plain(doc), origin=f"{out} (flexvar init)")
    lines.append(("sample.schedules", ", ".join(f"{k} {_spec_text(v)} ({_sides_text(params, k)})"
                                                 for k, v in sample.items()),
                  f"relative to the latent; sides at this {latent}x{latent} latent in brackets"))
    val = stats.val or max(1, round(stats.train * params.data.val_fraction))   # prepare splits val off train
    counts = DataCounts(stats.train - (0 if stats.val else val), val, classes)
    rates, how = rates_for(params, classes, budget, args.rate_gflops)
    steps_tok, steps_tf, rest = fit_steps(params, counts, rates, minutes)
    left = f"of what the {minutes:g} min leave after {rest / 60:.1f} min of sampling, evaluation and fixed costs"
    for section, steps, why in (("train_tokenizer", steps_tok, f"{TOKENIZER_SHARE:.0%} {left}"),
                                ("train_transformer", steps_tf, f"the other {1 - TOKENIZER_SHARE:.0%}, for depths "
                                                                f"{params.variants.depths}")):
        batch = doc[section]["batch_size"]
        epochs = steps * batch / stats.train
        why += f" ({epochs:.0f} epochs" + (f": capped at {MAX_EPOCHS}" if epochs >= MAX_EPOCHS - 1 else "") \
            + (f"; at least {MIN_STEPS} steps, over the budget" if steps == MIN_STEPS else "") + ")"
        _set(doc, f"{section}.steps", steps, why)
        lines.append((f"{section}.steps", steps, why))
        for key in ("warmup_steps", "eval_every", "checkpoint_every"):
            doc[section][key] = min(doc[section][key], max(1, steps // 5))
    params = load_params_dict(_plain(doc), origin=f"{out} (flexvar init)")
    buf = io.StringIO()
    y.dump(doc, buf)
    tmp = out.with_name(f".{out.name}.tmp")   # whole file or nothing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(f"# written by: flexvar init {args.source} --budget {budget} --minutes {minutes:g}"
                   + (f" --resolution {args.resolution}" if args.resolution else "")
                   + (f" --rate-gflops {args.rate_gflops}" if args.rate_gflops else "") + "\n" + buf.getvalue())
    tmp.replace(out)

    print(_describe(stats))
    for key, value, why in lines:
        print(f"  {key:<28} {str(value):<14} {why}")
    print(f"wrote {out} (validated)")
    costs = estimate(params, counts, rates)
    print(format_estimate(costs, rates, how))
    total = sum(c.seconds for c in costs) / 60
    if total > 1.05 * minutes:
        print(f"over the budget: {total:.0f} min estimated for --minutes {minutes:g}; give more minutes, a smaller "
              f"--resolution, or lower sample.per_class / variants in {out}")
    return 0


def _set(doc: Any, key: str, value: Any, why: str) -> None:
    """doc[section][name] = value (lists in flow style), its end-of-line comment replaced by the reason."""
    from ruamel.yaml.comments import CommentedSeq

    section, name = key.split(".")
    if isinstance(value, list):
        value = CommentedSeq(value)
        value.fa.set_flow_style()
    doc[section][name] = value
    doc[section].yaml_add_eol_comment(f"flexvar init: {why}", name, column=32)


def check_rates(text: str | None) -> None:
    from flexvar.estimate import parse_rates

    try:
        text is None or parse_rates(text)
    except ValueError:
        raise usage("--rate-gflops", f"{text!r} must be one positive number or two, comma-separated "
                                     f"(tokenizer,transformer GFLOP/s)") from None


def _spec_text(spec: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in spec.items()) + "}"


def _sides_text(params, name: str) -> str:
    """The long sides a named schedule of sample.schedules resolves to, e.g. 1,2,3,4,5,6,8 @ 32x32 px."""
    from flexvar.schedules import schedule_size, sides_of, spec_scales

    n = params.latent_size
    sides = sides_of(spec_scales(params.sample.schedules[name], (n, n), params.tokenizer.downsample))
    h, w = schedule_size(params, name)
    return ",".join(map(str, sides)) + f" @ {h}x{w} px"


def _describe(stats: FolderStats) -> str:
    per_class = stats.counts["train"]
    sides = sorted(stats.short_sides)
    text = (f"{stats.root}: {len(stats.classes)} classes, {stats.train} train + {stats.val} val images "
            f"(per class {min(per_class.values(), default=0)}..{max(per_class.values(), default=0)}); "
            f"short sides {sides[0]}..{sides[-1]} px, median {stats.median_short_side()}; "
            f"{stats.bad} bad files skipped" + (f" (e.g. {', '.join(stats.bad_examples)})" if stats.bad else "")
            + (f", {stats.other_files} other files ignored" if stats.other_files else "")
            + f"; scanned in {stats.seconds:.1f} s")
    return text


COMMANDS = {
    "init": ("write params.yaml sized to an image folder (imagefolder:<dir>) and estimate the run's time",
             _add_init, _run_init),
}
