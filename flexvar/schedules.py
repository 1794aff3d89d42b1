"""Step schedules, all in one place: which (h, w) token map each autoregressive step predicts.

Training samples a fresh schedule per batch (`ScheduleSampler`, paper §4.1): first scale 1,
last scale the full latent, random intermediate scales, random dropped steps, capped in steps
and tokens — so the model sees many step counts and learns to predict any scale from any
coarser one. `sampler_config` fills the sampler's null settings for a latent side n and
`sampler_problems` says which settings cannot work at n.

Inference takes any schedule (`resolve_schedule`): the paper's presets (Tab. 7, `PRESETS`), the
canonical schedule of the latent (`canonical_sides`), explicit scales (latent sides, or
fractions of the latent's long side), or `make_schedule(steps, size_hw)` for any step count,
output size and aspect ratio. Named schedules of params (`sample.schedules`, `sweep.eval_panel`)
are `ScheduleSpec`s; their output size may be pixels or relative to the training size ("2x"),
so they follow `data.resolution` and the tokenizer's downsampling (`spec_scales`, `spec_problem`).

    >>> make_schedule(10, (16, 16)) == [(s, s) for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    True
    >>> make_schedule(4, (8, 16))
    [(1, 1), (2, 3), (3, 6), (8, 16)]
    >>> canonical_sides(8), fraction_sides([0, 0.375, 0.625, 1], 16)
    ([1, 2, 3, 4, 5, 6, 8], [1, 6, 10, 16])
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from flexvar.errors import FlexvarError

# The settings these functions read are flexvar.config's sections, named in the annotations only:
# flexvar.config imports this module to validate them, so nothing here imports it back.
Scales = list[tuple[int, int]]


class ScheduleError(FlexvarError, ValueError):
    """A schedule or size that cannot be generated; the message names what is wrong."""


# Released inference schedules (official scripts/README) as scales of a 16x16 (256 px) or 32x32
# (512 px) latent. Entries marked derived are not in the released scripts; they are the same
# family (VAR's scales, then the output size) and are made by `make_schedule` conventions.
PRESETS: dict[str, list[int]] = {
    "256-6": [1, 2, 4, 6, 10, 16],
    "256-7": [1, 2, 3, 5, 8, 11, 16],                     # derived
    "256-8": [1, 2, 3, 5, 7, 10, 13, 16],
    "256-9": [1, 2, 3, 4, 5, 7, 10, 13, 16],
    "256-10": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
    "256-11": [1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 16],
    "256-12": [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16],
    "256-13": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16],
    "384-11": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 24],      # derived: 10-step schedule, then 24
    "512-12": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 32],  # derived: 10-step schedule, then 23, 32
    "512-15": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32],
}
CANONICAL = "canonical"   # preset name: the canonical schedule of the output's latent (canonical_sides)
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)   # VAR / FlexVAR 256 px canonical schedule


def preset(name: str) -> Scales:
    """A named Tab. 7 preset as (h, w) scales; KeyError lists the names."""
    if name not in PRESETS:
        raise KeyError(f"unknown schedule preset {name!r}; known: {', '.join(PRESETS)}")
    return [(s, s) for s in PRESETS[name]]


def canonical_sides(n: int) -> list[int]:
    """The canonical schedule of a latent with long side n: VAR's scales below n, then n (n=16: VAR's own)."""
    return [s for s in VAR_SCALES if s < n] + [n]


def fraction_sides(fractions: list[float], n: int) -> list[int]:
    """Fractions f of the long latent side n -> sides max(1, round(f n)) (halves round up)."""
    return [max(1, math.floor(f * n + 0.5)) for f in fractions]


def num_tokens(scales: Scales) -> int:
    return sum(h * w for h, w in scales)


def sides_of(scales: Scales) -> list[int]:
    """Long sides of a schedule (for names and logs)."""
    return [max(h, w) for h, w in scales]


def aspect(s: int, n: int, H: int, W: int) -> tuple[int, int]:
    """Side s of the long side n mapped onto an (H, W) latent, keeping the aspect ratio."""
    if s == n:
        return H, W
    return max(1, round(s * H / n)), max(1, round(s * W / n))


def _square_sides(steps: int, n: int) -> list[int]:
    """`steps` strictly increasing sides from 1 to n: a released 256 px preset when one fits,
    else geometric 1 -> n, each side at least one more than the previous and leaving room for the rest."""
    for sides in PRESETS.values():
        if len(sides) == steps and sides[-1] == n:
            return list(sides)
    if steps == 1:
        return [n]
    sides = [1]
    for i in range(1, steps):
        want = round(n ** (i / (steps - 1)))
        sides.append(min(max(sides[-1] + 1, want), n - (steps - 1 - i)))
    return sides


def make_schedule(steps: int, size_hw: tuple[int, int]) -> Scales:
    """A `steps`-step schedule ending at latent size (H, W), any aspect ratio.

    Sides are planned on the long side n = max(H, W) (a released preset when it has that many
    steps and ends at n), then the short side follows the aspect ratio, at least 1; steps that
    would repeat a scale are impossible because the long side strictly increases.
    """
    H, W = size_hw
    n = max(H, W)
    if not 1 <= steps <= n:
        raise ValueError(f"steps={steps} must be between 1 and the long latent side {n} for size {size_hw}")
    return [aspect(s, n, H, W) for s in _square_sides(steps, n)]


# --------------------------------------------------------------------------- training: the step sampler
def sampler_config(cfg: "flexvar.config.ScheduleConfig", full: int) -> "flexvar.config.ScheduleConfig":
    """A copy of params `schedule:` with canonical/groups/max_tokens filled in for a full latent side `full`.

    Official sampler at n=16: intermediate scales 3..15 split at 10 = 0.625 n; it draws 5 of
    the 8 lower ones and 2 of the 5 upper ones. The same split and the same fractions
    (5/8, 2/5, rounded) at any n: at n=8 that is 2 of 3..5 and 1 of 6..7. Canonical:
    `canonical_sides(n)`. max_tokens: the canonical schedule's token count.
    """
    canonical = cfg.canonical or canonical_sides(full)
    groups = cfg.groups
    if groups is None:
        low, split = (cfg.head[-1] + 1 if cfg.head else 1), round(0.625 * full)
        groups = []
        for lo, hi, frac in ((low, split, 5 / 8), (max(low, split + 1), full - 1, 2 / 5)):
            if hi >= lo:
                groups.append((min(hi - lo + 1, max(1, round(frac * (hi - lo + 1)))), lo, hi))
    max_tokens = cfg.max_tokens or sum(s * s for s in canonical)
    return cfg.model_copy(update={"canonical": canonical, "groups": groups, "max_tokens": max_tokens})


def sampler_problems(cfg: "flexvar.config.ScheduleConfig", full: int) -> list[tuple[tuple, Any, str]]:
    """(key path in `schedule:`, value, message) for each sampler setting that cannot work at latent side `full`."""
    out: list[tuple[tuple, Any, str]] = []
    r = sampler_config(cfg, full)
    if cfg.canonical is not None and cfg.canonical[-1] != full:
        out.append((("canonical",), cfg.canonical,
                    f"must end at the full latent side {full} (or null: derived from it)"))
    if cfg.head and cfg.head[-1] >= full:
        out.append((("head",), cfg.head, f"must stay below the full latent side {full}"))
    for i, (count, low, high) in enumerate(cfg.groups or []):
        if high >= full or (cfg.head and low <= cfg.head[-1]):
            out.append((("groups", i), [count, low, high],
                        f"must lie strictly between the head's last scale and the full latent side {full} "
                        f"(or null: derived from it)"))
    if len(cfg.head) + 1 > cfg.max_steps:
        out.append((("max_steps",), cfg.max_steps, f"must allow the head {cfg.head} plus the full scale"))
    floor = sum(s * s for s in cfg.head) + full * full
    if r.max_tokens < floor and cfg.overflow_keeps_full:
        out.append((("max_tokens",), cfg.max_tokens, f"must be at least {floor}, the head plus the full scale"))
    if r.max_tokens < full * full:
        out.append((("max_tokens",), cfg.max_tokens, f"must be at least {full * full}, the full scale's tokens"))
    return out


class ScheduleSampler:
    """Draws one training schedule per batch from a `ScheduleConfig`, with its own generator.

    Every draw uses only `self.generator` (a torch.Generator), so a run is reproducible and a
    checkpoint holding `state_dict()` resumes the exact sequence of schedules.
    """

    def __init__(self, cfg: "flexvar.config.ScheduleConfig", size_hw: tuple[int, int], seed: int):
        self.H, self.W = size_hw
        self.n = max(size_hw)
        self.cfg = sampler_config(cfg, self.n)
        self.generator = torch.Generator().manual_seed(seed)

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def _draw_sides(self) -> list[int]:
        cfg = self.cfg
        if self._rand() < cfg.canonical_prob:
            return list(cfg.canonical)
        picked: list[int] = []
        for count, low, high in cfg.groups:
            perm = torch.randperm(high - low + 1, generator=self.generator)[:count]
            picked += [low + int(i) for i in perm]
        return list(cfg.head) + sorted(set(picked) - set(cfg.head)) + [self.n]

    def _drop(self, sides: list[int]) -> list[int]:
        cfg, first = self.cfg, len(self.cfg.head)
        u = self._rand()
        drops = min(cfg.max_drops, sum(u < p for p in cfg.drop_probs))
        for _ in range(drops):
            if len(sides) - 1 <= first:
                break
            sides.pop(first + self._randint(len(sides) - 1 - first))
        return sides

    def _cap(self, sides: list[int]) -> list[int]:
        cfg, first = self.cfg, len(self.cfg.head)
        while num_tokens(self.to_hw(sides)) > cfg.max_tokens and len(sides) > 1:
            last = len(sides) if not cfg.overflow_keeps_full else len(sides) - 1
            lo = max(first if cfg.overflow_keeps_full else 0, last - cfg.overflow_window)
            if last <= lo:
                break
            sides.pop(lo + self._randint(last - lo))
        while len(sides) > cfg.max_steps:
            sides.pop(first + self._randint(len(sides) - 1 - first))
        return sides

    def to_hw(self, sides: list[int]) -> Scales:
        return [aspect(s, self.n, self.H, self.W) for s in sides]

    def sample(self) -> Scales:
        """One schedule as (h, w) per step, coarse to fine."""
        return self.to_hw(self._cap(self._drop(self._draw_sides())))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def expected_tokens(cfg: "flexvar.config.ScheduleConfig", size_hw: tuple[int, int], draws: int = 2000,
                    seed: int = 0) -> float:
    """Mean tokens per sampled schedule (a cost estimate for sizing batches and sweeps)."""
    sampler = ScheduleSampler(cfg, size_hw, seed)
    return sum(num_tokens(sampler.sample()) for _ in range(draws)) / draws


# --------------------------------------------------------------------------- inference: any schedule, size, aspect
def latent_size(size_hw: tuple[int, int], downsample: int) -> tuple[int, int]:
    """Output pixels (H, W) -> latent (H/f, W/f); both sides must be positive multiples of f."""
    H, W = size_hw
    if H <= 0 or W <= 0 or H % downsample or W % downsample:
        raise ScheduleError(f"size {H}x{W} must be positive multiples of the tokenizer's downsampling {downsample}")
    return H // downsample, W // downsample


def check_scales(scales: Scales) -> Scales:
    """Scales must be positive and grow: each (h, w) >= the previous in both sides, and not equal."""
    if not scales:
        raise ScheduleError("a schedule needs at least one scale")
    for h, w in scales:
        if h < 1 or w < 1:
            raise ScheduleError(f"scale {h}x{w} must have positive sides")
    for (h0, w0), (h1, w1) in zip(scales, scales[1:]):
        if h1 < h0 or w1 < w0 or (h1, w1) == (h0, w0):
            raise ScheduleError(f"scales must grow step by step; {h0}x{w0} is followed by {h1}x{w1}")
    return [(int(h), int(w)) for h, w in scales]


def resolve_schedule(*, steps: int | None = None, scales: list | None = None, preset: str | None = None,
                     size_hw: tuple[int, int] | None = None, train_latent_hw: tuple[int, int],
                     downsample: int) -> Scales:
    """The (h, w) of every step from one of `steps`, `scales`, `preset` (exactly one).

    `size_hw` is the output in pixels (default: the training resolution). Int scales and Tab. 7
    preset sides are long sides: they end at the long latent side of the size, and the short side
    follows the aspect ratio; without a size they also set the size (square). Relative to the
    output's latent (long side n): `steps`, the preset "canonical" (`canonical_sides(n)`) and
    float scales, fractions of n in [0, 1] ending at 1.0 (`fraction_sides`).
    """
    given = [k for k, v in (("steps", steps), ("scales", scales), ("preset", preset)) if v is not None]
    if len(given) != 1:
        raise ScheduleError(f"give exactly one of steps, scales, preset (got {', '.join(given) or 'none'})")
    if preset is not None and preset != CANONICAL:
        if preset not in PRESETS:
            raise ScheduleError(f"unknown preset {preset!r}; known: {CANONICAL}, {', '.join(PRESETS)}")
        scales = list(PRESETS[preset])
    fractions = scales is not None and any(isinstance(s, float) for s in scales)
    if scales is not None and all(isinstance(s, (tuple, list)) for s in scales):
        out = check_scales([tuple(s) for s in scales])
        if size_hw is not None and out[-1] != latent_size(size_hw, downsample):
            H, W = latent_size(size_hw, downsample)
            raise ScheduleError(f"last scale {out[-1][0]}x{out[-1][1]} must equal the latent {H}x{W} of the size")
        return out
    if scales is not None and not fractions:
        if not all(isinstance(s, int) for s in scales):
            raise ScheduleError("scales must all be ints or all (h, w) pairs")
        if size_hw is None:
            return check_scales([(s, s) for s in scales])
        H, W = latent_size(size_hw, downsample)
        n = max(H, W)
        if scales[-1] != n:
            raise ScheduleError(f"last scale {scales[-1]} must equal the long latent side {n} of size "
                                f"{size_hw[0]}x{size_hw[1]}")
        return check_scales([aspect(s, n, H, W) for s in scales])
    H, W = latent_size(size_hw, downsample) if size_hw is not None else tuple(train_latent_hw)
    n = max(H, W)
    if preset == CANONICAL:
        return check_scales([aspect(s, n, H, W) for s in canonical_sides(n)])
    if fractions:
        if any(not 0.0 <= f <= 1.0 for f in scales) or scales[-1] != 1.0:
            raise ScheduleError(f"scale fractions {scales} must lie in [0, 1] and end at 1.0 (the full latent)")
        sides = fraction_sides(scales, n)
        if any(b <= a for a, b in zip(sides, sides[1:])):
            raise ScheduleError(f"scale fractions {scales} give sides {sides} at the long latent side {n}: "
                                f"two steps land on one scale (use fewer scales or a larger latent)")
        return check_scales([aspect(s, n, H, W) for s in sides])
    if not 1 <= steps <= n:
        raise ScheduleError(f"steps={steps} must be between 1 and the long latent side {n} "
                            f"(size {H * downsample}x{W * downsample}; each step grows the scale by at least 1)")
    return make_schedule(steps, (H, W))


# --------------------------------------------------------------------------- named schedules of params
RELATIVE_SIZE = re.compile(r"^(\d+(?:\.\d+)?)x$")   # "2x": twice the training size on that side


def size_side(side: int | str, train_side: int) -> int:
    """One side of a schedule's `size`: pixels (int) or relative to the training side ("2x", "1.5x")."""
    if isinstance(side, int):
        return side
    m = RELATIVE_SIZE.match(str(side))
    px = float(m.group(1)) * train_side if m else -1.0
    if px < 1 or abs(px - round(px)) > 1e-9:
        raise ScheduleError(f"size {side!r} of the training side {train_side} px is not a whole number of pixels")
    return round(px)


def spec_size(spec: "flexvar.config.ScheduleSpec", train_px_hw: tuple[int, int]) -> tuple[int, int] | None:
    """Output (H, W) pixels of a named schedule for a model trained at `train_px_hw`; None = the training size."""
    if spec.size is None:
        return None
    return size_side(spec.size[0], train_px_hw[0]), size_side(spec.size[1], train_px_hw[1])


def spec_scales(spec: "flexvar.config.ScheduleSpec", train_latent_hw: tuple[int, int], downsample: int) -> Scales:
    """(h, w) scales of a named schedule from params (a `ScheduleSpec` of sample.schedules or
    sweep.eval_panel) for a model trained at `train_latent_hw` latents."""
    train_px = (train_latent_hw[0] * downsample, train_latent_hw[1] * downsample)
    return resolve_schedule(steps=spec.steps, scales=spec.scales, preset=spec.preset,
                            size_hw=spec_size(spec, train_px), train_latent_hw=tuple(train_latent_hw),
                            downsample=downsample)


def spec_problem(spec: "flexvar.config.ScheduleSpec", train_latent_hw: tuple[int, int],
                 downsample: int) -> tuple[str, str] | None:
    """(field, message) when a named schedule cannot be made for this training latent, else None."""
    field = next(k for k in ("steps", "scales", "preset") if getattr(spec, k) is not None)
    train_px = (train_latent_hw[0] * downsample, train_latent_hw[1] * downsample)
    try:
        size = spec_size(spec, train_px)
    except ScheduleError as e:
        return "size", str(e)
    if size is not None and (size[0] % downsample or size[1] % downsample):
        return "size", f"{size[0]}x{size[1]} px must be multiples of the tokenizer's downsampling {downsample}"
    n = max(train_latent_hw)
    if (spec.scales is not None and size is None and not any(isinstance(s, float) for s in spec.scales)
            and spec.scales[-1] != n):
        return "scales", (f"must end at the full latent side {n}, or give a size, or write the scales as "
                          f"fractions of the latent ending at 1.0")
    try:
        spec_scales(spec, train_latent_hw, downsample)
    except ScheduleError as e:
        return field, str(e)
    return None


def schedule_steps(params: "flexvar.config.Params", schedule: str) -> int | None:
    """Number of generation steps of a named schedule in sample.schedules (None: not there / cannot be made)."""
    spec = params.sample.schedules.get(schedule)
    if spec is None:
        return None
    n = params.latent_size
    try:
        return len(spec_scales(spec, (n, n), params.tokenizer.downsample))
    except ScheduleError:
        return None


def schedule_size(params: "flexvar.config.Params", schedule: str) -> tuple[int, int] | None:
    """Output (H, W) pixels of a named schedule; the training resolution unless it sets `size`."""
    spec = params.sample.schedules.get(schedule)
    if spec is None:
        return None
    res = params.data.resolution
    return spec_size(spec, (res, res)) or (res, res)


__all__ = ["Scales", "ScheduleError", "PRESETS", "CANONICAL", "VAR_SCALES", "preset", "canonical_sides",
           "fraction_sides", "num_tokens", "sides_of", "aspect", "make_schedule", "sampler_config",
           "sampler_problems", "ScheduleSampler", "expected_tokens", "latent_size", "check_scales",
           "resolve_schedule", "size_side", "spec_size", "spec_scales", "spec_problem", "schedule_steps",
           "schedule_size"]
