"""params.yaml validation: every bad value fails before work starts, naming the key path and value."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from flexvar.config import ConfigError, Params, load_params, load_params_dict, select
from flexvar.presets import apply_preset, available

BAD_CASES = [
    ({"train_tokenizer": {"lr": -0.001}}, "train_tokenizer.lr = -0.001"),
    ({"train_transformer": {"lr": 0}}, "train_transformer.lr = 0"),
    ({"schedule": {"canonical_prob": 1.5}}, "schedule.canonical_prob = 1.5"),
    ({"schedule": {"drop_probs": [0.1, -0.2]}}, "schedule.drop_probs = [0.1, -0.2]"),
    ({"schedule": {"canonical": [1, 2, 4, 3, 8]}}, "schedule.canonical = [1, 2, 4, 3, 8]"),
    ({"schedule": {"canonical": [1, 2, 3, 4, 6]}}, "schedule.canonical = [1, 2, 3, 4, 6]"),
    ({"data": {"resolution": 61}}, "data.resolution = 61"),
    ({"data": {"source": "s3://bucket"}}, "data.source = 's3://bucket'"),
    ({"data": {"on_bad_image": "ignore"}}, "data.on_bad_image = 'ignore'"),
    ({"tokenizer": {"ch_mult": [1, 2, 2]}, "data": {"resolution": 66}}, "data.resolution = 66"),
    ({"trainer": {"lr": 1}}, "trainer = {'lr': 1}"),
    ({"train_tokenizer": {"learning_rate": 1}}, "train_tokenizer.learning_rate = 1"),
    ({"train_tokenizer": {"steps": "many"}}, "train_tokenizer.steps = 'many'"),
    ({"train_tokenizer": {"betas": [0.9, 1.5]}}, "train_tokenizer.betas = [0.9, 1.5]"),
    ({"sample": {"schedules": {"x": {"scales": [1, 2, 5]}}}}, "sample.schedules.x.scales = [1, 2, 5]"),
    ({"sample": {"schedules": {"x": {"steps": 4, "size": [101, 64]}}}}, "sample.schedules.x.size = [101, 64]"),
    ({"sample": {"schedules": {"x": {"steps": 4, "scales": [1, 8]}}}}, "sample.schedules.x"),
    ({"sample": {"top_p": 2}}, "sample.top_p = 2"),
    ({"variants": {"schedules": ["short", "missing"]}}, "variants.schedules.1 = 'missing'"),
    ({"variants": {"depths": []}}, "variants.depths = []"),
    ({"transformer": {"depth": 3, "width": 200}}, "transformer.heads = 3"),
    ({"schedule": {"groups": [[5, 3, 4]]}}, "schedule.groups"),
    ({"evaluate": {"feature_space": "clip"}}, "evaluate.feature_space = 'clip'"),
    ({"seed": -1}, "seed = -1"),
    ({"sample": {"cfg": 2.0}}, "sample.cfg = 2.0: renamed: write sample.guidance instead"),
    ({"sample": {"schedules": {"x": {"steps": 4, "size": "3y"}}}}, "sample.schedules.x.size = '3y'"),
    ({"sample": {"schedules": {"x": {"scales": [0.0, 0.5, 0.9]}}}}, "sample.schedules.x = "),
    ({"sample": {"schedules": {"x": {"preset": "256-99"}}}}, "sample.schedules.x.preset = '256-99'"),
    ({"sample": {"schedules": {"x": {"steps": 4, "size": "1.3x"}}}}, "sample.schedules.x.size = ['1.3x', '1.3x']"),
]


@pytest.mark.parametrize("data,expected", BAD_CASES, ids=[c[1].split(" ")[0] for c in BAD_CASES])
def test_bad_value_names_key_path(data, expected):
    with pytest.raises(ConfigError) as exc:
        load_params_dict(data)
    assert expected in str(exc.value)
    assert str(exc.value).startswith("params.yaml: ")


def test_committed_params_valid(project_root):
    params = load_params(project_root / "params.yaml")
    assert params.latent_size == params.data.resolution // params.tokenizer.downsample
    # committed file spells out the defaults of the typed config, section by section
    raw = yaml.safe_load((project_root / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields)


def _missing_keys(model, raw: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the typed config (sections recursed) that the raw params file does not spell out."""
    from pydantic import BaseModel

    out = []
    for name, field in type(model).model_fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            out.append(key)
        elif isinstance(getattr(model, name), BaseModel):
            out += _missing_keys(getattr(model, name), raw[name], f"{key}.")
    return out


def test_typed_defaults_are_params_yaml(project_root):
    """Defaults live in one place: params.yaml spells out every key of the typed config, and each
    value equals the config's default (a default changed in only one of the two fails here)."""
    raw = yaml.safe_load((project_root / "params.yaml").read_text())
    assert _missing_keys(Params(), raw) == []
    committed, defaults = load_params_dict(raw).model_dump(mode="json"), Params().model_dump(mode="json")
    assert _differences(committed, defaults) == {}, "params.yaml value vs flexvar/config.py default"


def _differences(a, b, path: tuple = ()) -> dict:
    """{dotted path: (a's value, b's value)} wherever two nested mappings differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for k in a.keys() | b.keys():
            out.update(_differences(a.get(k, "<missing>"), b.get(k, "<missing>"), (*path, k)))
        return out
    return {} if a == b else {".".join(map(str, path)): (a, b)}


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as exc:
        load_params_dict({"train_tokenizer": {"lr": -1, "steps": 0}})
    assert "train_tokenizer.lr = -1" in str(exc.value) and "train_tokenizer.steps = 0" in str(exc.value)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_select_flattens_stage_params():
    params = load_params_dict({})
    sel = select(params, ["seed", "train_tokenizer.lr", "data"])
    assert sel["seed"] == 0 and sel["train_tokenizer.lr"] == params.train_tokenizer.lr
    assert sel["data.resolution"] == params.data.resolution


def leaves(d: dict, path: tuple = ()) -> dict[tuple, object]:
    """Dotted leaves of a params mapping; a named schedule (sample.schedules.X, sweep.eval_panel.X) is one leaf."""
    out = {}
    for k, v in d.items():
        key = (*path, k)
        if isinstance(v, dict) and v and path not in {("sample", "schedules"), ("sweep", "eval_panel")}:
            out |= leaves(v, key)
        else:
            out[key] = v
    return out


@pytest.mark.parametrize("name", available())
def test_every_preset_merges_to_valid_params(name, project_root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((project_root / "params.yaml").read_text())
    apply_preset(name, params)
    load_params(params)
    assert "# FlexVAR pipeline settings" in params.read_text()  # comments kept
    base = leaves(yaml.safe_load((project_root / "params.yaml").read_text()))
    preset = leaves(yaml.safe_load((project_root / "presets" / f"{name}.yaml").read_text()))
    merged = leaves(yaml.safe_load(params.read_text()))
    for key, value in preset.items():
        assert merged[key] == value, key                         # what the preset sets, it sets
    for key, value in base.items():                              # and it keeps every other setting
        if not any(key[:len(p)] == p or p[:len(key)] == key for p in preset):
            assert merged.get(key) == value, (key, "dropped or changed by the merge")


def test_preset_cli_merges_and_rejects_bad(project_root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((project_root / "params.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_transformer:\n  lr: -3\n")
    flexvar = [sys.executable, "-m", "flexvar.cli"]
    r = subprocess.run(flexvar + ["preset", str(bad), "--params", str(params)], capture_output=True, text=True,
                       cwd=project_root)
    assert r.returncode == 2 and "train_transformer.lr = -3" in r.stderr and "Traceback" not in r.stderr
    assert "lr: -3" not in params.read_text()  # nothing written on error
    r = subprocess.run(flexvar + ["preset", "smoke", "--params", str(params)], capture_output=True, text=True,
                       cwd=project_root)
    assert r.returncode == 0, r.stderr
    smoke = yaml.safe_load((project_root / "presets" / "smoke.yaml").read_text())
    merged = yaml.safe_load(params.read_text())
    for section, values in smoke.items():
        if isinstance(values, dict):
            for k, v in values.items():
                assert merged[section][k] == v
    r = subprocess.run(flexvar + ["preset", "no-such-preset", "--params", str(params)], capture_output=True,
                       text=True, cwd=project_root)
    assert r.returncode == 2 and "smoke" in r.stderr
