"""Step schedules: which (h, w) token map each autoregressive step predicts.

Training samples a fresh schedule per batch (`ScheduleSampler`, paper §4.1): first scale 1,
last scale the full latent, random intermediate scales, random dropped steps, capped in steps
and tokens — so the model sees many step counts and learns to predict any scale from any
coarser one. Inference takes any schedule: the paper's presets (Tab. 7, `PRESETS`) or
`make_schedule(steps, size_hw)` for any step count, output size and aspect ratio.

    >>> make_schedule(10, (16, 16)) == [(s, s) for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    True
    >>> make_schedule(4, (8, 16))
    [(1, 1), (2, 3), (3, 6), (8, 16)]
"""
from __future__ import annotations

import torch

from flexvar.config import Params, ScheduleConfig

Scales = list[tuple[int, int]]

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


def preset(name: str) -> Scales:
    """A named Tab. 7 preset as (h, w) scales; KeyError lists the names."""
    if name not in PRESETS:
        raise KeyError(f"unknown schedule preset {name!r}; known: {', '.join(PRESETS)}")
    return [(s, s) for s in PRESETS[name]]


def num_tokens(scales: Scales) -> int:
    return sum(h * w for h, w in scales)


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
    return [_aspect(s, n, H, W) for s in _square_sides(steps, n)]


def _aspect(s: int, n: int, H: int, W: int) -> tuple[int, int]:
    """Side s of the long side n mapped onto an (H, W) latent, keeping the aspect ratio."""
    if s == n:
        return H, W
    return max(1, round(s * H / n)), max(1, round(s * W / n))


class ScheduleSampler:
    """Draws one training schedule per batch from a `ScheduleConfig`, with its own generator.

    Every draw uses only `self.generator` (a torch.Generator), so a run is reproducible and a
    checkpoint holding `state_dict()` resumes the exact sequence of schedules.
    """

    def __init__(self, cfg: ScheduleConfig, size_hw: tuple[int, int], seed: int):
        self.H, self.W = size_hw
        self.n = max(size_hw)
        self.cfg = cfg.resolved(self.n)
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
        return [_aspect(s, self.n, self.H, self.W) for s in sides]

    def sample(self) -> Scales:
        """One schedule as (h, w) per step, coarse to fine."""
        return self.to_hw(self._cap(self._drop(self._draw_sides())))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def expected_tokens(cfg: ScheduleConfig, size_hw: tuple[int, int], draws: int = 2000, seed: int = 0) -> float:
    """Mean tokens per sampled schedule (a cost estimate for sizing batches and sweeps)."""
    sampler = ScheduleSampler(cfg, size_hw, seed)
    return sum(num_tokens(sampler.sample()) for _ in range(draws)) / draws


def sides_of(scales: Scales) -> list[int]:
    """Long sides of a schedule (for names and logs)."""
    return [max(h, w) for h, w in scales]


__all__ = ["PRESETS", "preset", "make_schedule", "num_tokens", "ScheduleSampler", "expected_tokens",
           "sides_of", "Scales", "schedule_steps", "schedule_size"]


# --------------------------------------------------------------------------- named sample schedules
def schedule_steps(params: Params, schedule: str) -> int | None:
    """Number of generation steps of a named schedule in sample.schedules."""
    spec = params.sample.schedules.get(schedule)
    if spec is None:
        return None
    if spec.steps is not None:
        return spec.steps
    if spec.scales is not None:
        return len(spec.scales)
    return len(PRESETS[spec.preset]) if spec.preset in PRESETS else None


def schedule_size(params: Params, schedule: str) -> tuple[int, int] | None:
    """Output (H, W) of a named schedule; the training resolution unless it sets `size`."""
    spec = params.sample.schedules.get(schedule)
    if spec is None:
        return None
    return tuple(spec.size) if spec.size else (params.data.resolution, params.data.resolution)
