"""The sweep's flexibility objective and search space (no Ray needed: the pieces the trials use).

- The default search space names every sampler probability that matters at the embedded default
  (canonical_prob, the reachable drop probabilities, both group counts); both corners are valid.
- A range that can make invalid settings fails before any trial, naming sweep.search_space.
- The winner is written as whole settings (lists, not list indices) and applies as a preset.
- eval_panel members are validated like sample.schedules, naming sweep.eval_panel.<name>.
- evaluate_panel scores a real (tiny) model on every panel schedule, including sizes beyond the
  cached latent, and the panel loss is their mean.
- The transfer table puts each FID beside its bootstrap interval (where evaluated) and the change.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from flexvar.config import ConfigError, load_params, load_params_dict
from flexvar.schedules import sampler_config
from tests.flows_support import ROOT


def test_default_space_covers_the_sampler_and_its_corners_are_valid():
    from flows.sweep import get_dotted, search_space, sweep_base

    params = load_params(ROOT / "params.yaml")
    space = params.sweep.search_space
    assert {"schedule.canonical_prob", "schedule.groups.0.0", "schedule.groups.1.0"} <= set(space)
    n = params.latent_size
    groups = sampler_config(params.schedule, n).groups
    intermediates = sum(c for c, _, _ in groups)            # droppable steps of a drawn schedule
    assert {f"schedule.drop_probs.{i}" for i in range(intermediates)} <= set(space)
    base = sweep_base(params)
    assert get_dotted(base, "schedule.groups.0.0") == groups[0][0]
    domains = search_space(params)                            # validates both corners
    assert type(domains["schedule.groups.0.0"]).__name__ == "Integer"
    assert type(domains["schedule.canonical_prob"]).__name__ == "Float"


def test_overlapping_drop_ranges_fail_before_any_trial():
    from flows.sweep import search_space

    params = load_params_dict({"sweep": {"search_space": {"schedule.drop_probs.0": [0.0, 0.2],
                                                          "schedule.drop_probs.1": [0.05, 0.3]}}})
    with pytest.raises(ConfigError, match=r"sweep.search_space.*drop_probs.*non-increasing"):
        search_space(params)


def test_winner_is_whole_settings_and_applies_as_preset(tmp_path):
    from flexvar.presets import apply_preset
    from flows.sweep import best_config_yaml, dvc_set_args, settings_of, sweep_base

    params = load_params(ROOT / "params.yaml")
    trial = {"schedule.canonical_prob": 0.3, "schedule.drop_probs.0": 0.4, "schedule.groups.1.0": 2}
    settings = settings_of(sweep_base(params), trial)
    assert settings == {"schedule.canonical_prob": 0.3, "schedule.drop_probs": [0.4, 0.05, 0.02, 0.01],
                        "schedule.groups": [[2, 3, 5], [2, 6, 7]]}
    best = tmp_path / "best.yaml"
    best.write_text(best_config_yaml(settings, "val_loss_panel", 1.0))
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    apply_preset(str(best), target)
    applied = load_params(target).schedule
    assert applied.drop_probs == [0.4, 0.05, 0.02, 0.01] and applied.groups == [(2, 3, 5), (2, 6, 7)]
    assert "-S 'schedule.groups=[[2,3,5],[2,6,7]]'" in dvc_set_args(settings)


def test_panel_members_are_validated_by_name():
    with pytest.raises(ConfigError, match=r"sweep.eval_panel.odd.size"):
        load_params_dict({"sweep": {"eval_panel": {"odd": {"steps": 4, "size": [61, 64]}}}})
    with pytest.raises(ConfigError, match=r"sweep.eval_panel.bad.scales"):
        load_params_dict({"sweep": {"eval_panel": {"bad": {"scales": [1, 2, 4]}}}})


def test_default_panel_mirrors_sample_schedules_and_goes_beyond():
    from flexvar.schedules import sides_of, spec_scales

    params = load_params(ROOT / "params.yaml")
    panel, canonical = params.sweep.eval_panel, sampler_config(params.schedule, params.latent_size).canonical
    assert {k: v for k, v in panel.items() if k in params.sample.schedules} == params.sample.schedules
    n = params.latent_size
    scales = {name: spec_scales(spec, (n, n), params.tokenizer.downsample) for name, spec in panel.items()}
    steps = {name: len(s) for name, s in scales.items()}
    assert min(steps.values()) < len(canonical) < max(steps.values())
    assert any(panel[k].scales is not None and sides_of(s) != canonical for k, s in scales.items())   # uneven
    assert any(max(s[-1]) > n for s in scales.values())                       # beyond the training latent
    assert any(s[-1][0] != s[-1][1] for s in scales.values())                 # another aspect ratio


def test_evaluate_panel_on_a_tiny_model(tmp_path):
    from flexvar.data.latent_cache import load_latents
    from flexvar.schedules import spec_scales
    from flexvar.tokenizer.vqvae import load_tokenizer
    from flexvar.transformer.model import FlexVAR
    from flexvar.transformer.training import evaluate, evaluate_panel, latent_at
    from tests.flows_support import stage_workdir

    d = stage_workdir(tmp_path)
    params = load_params_dict({**yaml.safe_load((d / "params.yaml").read_text()),
                               "sweep": {"eval_panel": {"canonical": {"scales": [1, 2, 3, 4, 5, 6, 8]},
                                                        "short": {"steps": 3},
                                                        "wide": {"steps": 4, "size": [32, 64]}}}})
    val = load_latents(d / "lat", "val")
    quantizer = load_tokenizer(d / "tok", "cpu").quantize
    torch.manual_seed(0)
    model = FlexVAR(params.transformer_for_depth(1), quantizer.codebook_size, quantizer.codebook_dim,
                    val.num_classes, pe_size=8)
    panel = {k: spec_scales(s, val.latent_hw, params.tokenizer.downsample) for k, s in params.sweep.eval_panel.items()}
    assert panel["wide"][-1] == (8, 16)
    z = val.latents_N2CHW[:2, 0]
    assert latent_at(z, (8, 8)) is z and latent_at(z, (8, 16)).shape[-2:] == (8, 16)
    out = evaluate_panel(model, quantizer, val, panel, "gt", 8, 1, torch.device("cpu"), "fp32")
    assert set(out) == {f"val_{m}/{k}" for m in ("loss", "acc") for k in panel} | {"val_loss_panel", "val_acc_panel"}
    canonical = evaluate(model, quantizer, val, panel["canonical"], "gt", 8, 1, torch.device("cpu"), "fp32")
    assert out["val_loss/canonical"] == pytest.approx(canonical["val_loss"])
    assert out["val_loss_panel"] == pytest.approx(sum(out[f"val_loss/{k}"] for k in panel) / 3)
    assert all(0.0 < out[f"val_loss/{k}"] < 10.0 for k in panel)       # finite, near log(64) for a fresh model


def test_transfer_table_shows_each_fid_with_its_interval_and_the_change():
    from flows.transfer import comparison_table

    rows = [{"setting": "default", "schedule": "short", "steps": 4, "size": "64x64", "fid_domain": 20.0,
             "fid_domain_ci_low": 19.5, "fid_domain_ci_high": 21.25},
            {"setting": "best", "schedule": "short", "steps": 4, "size": "64x64", "fid_domain": 18.5},
            {"setting": "default", "schedule": "long", "steps": 8, "size": "64x64", "fid_domain": 16.0},
            {"setting": "best", "schedule": "long", "steps": 8, "size": "64x64", "fid_domain": 17.0,
             "fid_domain_ci_low": 16.0, "fid_domain_ci_high": 18.0}]
    lines = comparison_table(rows, "domain").splitlines()
    assert lines[2] == "| short | 4 | 64x64 | 20.000 [19.50, 21.25] | 18.500 | -1.500 |"
    assert lines[3] == "| long | 8 | 64x64 | 16.000 | 17.000 [16.00, 18.00] | +1.000 |"
    assert lines[4] == "| **mean** | | | 18.000 | 17.750 | -0.250 |"
