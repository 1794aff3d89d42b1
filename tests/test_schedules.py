"""Training step sampler and inference schedules."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from flexvar.config import ConfigError, ScheduleConfig, load_params_dict
from flexvar.schedules import PRESETS, ScheduleSampler, make_schedule, num_tokens, preset, sampler_config


def official_sampler(rng: random.Random) -> list[int]:
    """The released FlexVAR trainer's sampler at a 16x16 latent, restated for comparison."""
    if rng.random() < 0.05:
        s = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    else:
        s = [1, 2] + sorted(rng.sample(range(3, 11), 5) + rng.sample(range(11, 16), 2)) + [16]
    x = rng.random()
    for threshold in (0.9, 0.95, 0.98, 0.99):
        if x > threshold:
            s.pop(rng.choice(range(2, len(s) - 1)))
    while sum(v * v for v in s) > 680:
        s.pop(rng.choice(range(len(s) - 4, len(s))))
    return s


def test_defaults_resolve_to_the_official_sampler_at_16():
    r = sampler_config(ScheduleConfig(), 16)
    assert r.canonical == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert r.groups == [(5, 3, 10), (2, 11, 15)]
    assert r.max_tokens == 680 and r.canonical_prob == 0.05 and r.max_steps == 10
    assert r.drop_probs == [0.10, 0.05, 0.02, 0.01] and r.max_drops == 4


def test_sampler_distribution_matches_official_at_16():
    n = 4000
    ours = ScheduleSampler(ScheduleConfig(), (16, 16), seed=0)
    mine = [[h for h, _ in ours.sample()] for _ in range(n)]
    rng = random.Random(0)
    ref = [official_sampler(rng) for _ in range(n)]
    for stat in (len, lambda s: s[-1], lambda s: num_tokens([(v, v) for v in s])):
        a, b = Counter(map(stat, mine)), Counter(map(stat, ref))
        for key in set(a) | set(b):
            assert abs(a[key] - b[key]) / n < 0.03, (key, a[key], b[key])
    assert sum(s == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] for s in mine) / n == pytest.approx(0.05 * 0.9, abs=0.015)


def test_sampler_respects_every_param():
    cfg = ScheduleConfig(canonical_prob=0.0, head=[1, 3], groups=[(2, 4, 6), (1, 8, 9)],
                         drop_probs=[0.5], max_drops=1, max_steps=5, max_tokens=200, overflow_keeps_full=True)
    sampler = ScheduleSampler(cfg, (10, 10), seed=3)
    lengths = Counter()
    for _ in range(500):
        s = [h for h, _ in sampler.sample()]
        assert s[:2] == [1, 3] and s[-1] == 10 and len(s) <= 5
        assert num_tokens([(v, v) for v in s]) <= 200
        assert all(4 <= v <= 6 or v in (8, 9) for v in s[2:-1])
        lengths[len(s)] += 1
    assert set(lengths) <= {3, 4, 5} and lengths[5] > 50 and lengths[4] > 50


def test_sampler_is_seeded_and_resumable():
    a = ScheduleSampler(ScheduleConfig(), (8, 8), seed=7)
    first = [a.sample() for _ in range(5)]
    state = a.state_dict()
    rest = [a.sample() for _ in range(5)]
    b = ScheduleSampler(ScheduleConfig(), (8, 8), seed=7)
    assert [b.sample() for _ in range(5)] == first
    c = ScheduleSampler(ScheduleConfig(), (8, 8), seed=99)
    c.load_state_dict(state)
    assert [c.sample() for _ in range(5)] == rest


def test_sampler_non_square_latent():
    sampler = ScheduleSampler(ScheduleConfig(), (8, 12), seed=0)
    for _ in range(50):
        s = sampler.sample()
        assert s[0] == (1, 1) and s[-1] == (8, 12)
        assert all(h2 >= h1 and w2 > w1 for (h1, w1), (h2, w2) in zip(s, s[1:]))


def test_presets_and_make_schedule():
    assert preset("256-10") == make_schedule(10, (16, 16))
    for name, sides in PRESETS.items():
        assert sides[0] == 1 and sides == sorted(set(sides)) and sides[-1] == int(name.split("-")[0]) // 16
        assert len(sides) == int(name.split("-")[1])
    for steps in range(1, 9):
        s = make_schedule(steps, (8, 8))
        assert len(s) == steps and s[-1] == (8, 8) and len(set(s)) == steps
    wide = make_schedule(6, (6, 24))
    assert wide[-1] == (6, 24) and all(h == max(1, round(w / 4)) for h, w in wide)   # long side planned, aspect kept
    with pytest.raises(ValueError, match="steps"):
        make_schedule(9, (8, 8))
    with pytest.raises(KeyError, match="256-10"):
        preset("256-99")


@pytest.mark.parametrize("schedule, key", [
    ({"drop_probs": [0.1, 0.2]}, "schedule.drop_probs"),
    ({"drop_probs": [1.5]}, "schedule.drop_probs"),
    ({"canonical_prob": -0.1}, "schedule.canonical_prob"),
    ({"canonical": [1, 2, 4]}, "schedule.canonical"),
    ({"groups": [[3, 3, 4]]}, "schedule.groups"),
    ({"groups": [[1, 3, 9]]}, "schedule.groups.0"),
    ({"head": [1, 8]}, "schedule.head"),
    ({"max_tokens": 10}, "schedule.max_tokens"),
    ({"max_steps": 2}, "schedule.max_steps"),
    ({"bogus": 1}, "schedule.bogus"),
])
def test_bad_schedule_params_name_the_key(schedule, key):
    with pytest.raises(ConfigError) as e:
        load_params_dict({"schedule": schedule})     # embedded default: 8x8 latent
    assert f"{key} = " in str(e.value)


# --------------------------------------------------------------------------- named schedules that follow the latent
@pytest.mark.parametrize("n, canonical", [(4, [1, 2, 3, 4]), (8, [1, 2, 3, 4, 5, 6, 8]),
                                          (16, [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]),
                                          (32, [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 32])])
def test_canonical_preset_is_the_samplers_canonical_at_every_latent(n, canonical):
    from flexvar.config import ScheduleSpec
    from flexvar.schedules import spec_scales

    assert sampler_config(ScheduleConfig(), n).canonical == canonical
    assert spec_scales(ScheduleSpec(preset="canonical"), (n, n), 2) == [(s, s) for s in canonical]


def test_scale_fractions_and_relative_sizes():
    from flexvar.config import ScheduleSpec
    from flexvar.schedules import ScheduleError, spec_scales, spec_size

    uneven = ScheduleSpec(scales=[0.0, 0.375, 0.625, 1.0])
    assert [s for s, _ in spec_scales(uneven, (8, 8), 2)] == [1, 3, 5, 8]      # the former [1, 3, 5, 8]
    assert [s for s, _ in spec_scales(uneven, (16, 16), 2)] == [1, 6, 10, 16]
    assert [s for s, _ in spec_scales(uneven, (4, 4), 2)] == [1, 2, 3, 4]      # halves round up
    with pytest.raises(ScheduleError, match="two steps land on one scale"):
        spec_scales(uneven, (2, 2), 2)
    large, wide = ScheduleSpec(steps=8, size="2x"), ScheduleSpec(steps=6, size=["1x", "2x"])
    assert spec_size(large, (16, 16)) == (32, 32) and spec_size(large, (64, 64)) == (128, 128)
    assert spec_scales(large, (8, 8), 2)[-1] == (16, 16) and spec_scales(large, (32, 32), 2)[-1] == (64, 64)
    assert spec_scales(wide, (8, 8), 2)[-1] == (8, 16)
    assert spec_size(ScheduleSpec(steps=4, size=[24, "1.5x"]), (16, 16)) == (24, 24)
    with pytest.raises(ScheduleError, match="whole number of pixels"):
        spec_size(ScheduleSpec(steps=4, size="1.3x"), (16, 16))
