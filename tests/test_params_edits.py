"""One edit of params.yaml never leaves an invalid file, and a real conflict is one error naming both keys.

Changing `data.resolution` or the tokenizer's downsampling (the length of `tokenizer.ch_mult`) alone:
the committed schedules are written relative to the latent (steps, preset canonical, fractions,
size 2x), so they follow. A latent too small for a schedule is reported once per key, naming the
schedule's key and data.resolution / tokenizer.ch_mult, and only by the stages that read that
schedule (`prepare` does not read sample.schedules).
"""
from __future__ import annotations

import copy
import importlib

import pytest
import yaml

from flexvar.config import ConfigError, load_params, load_params_dict
from flexvar.schedules import schedule_size, spec_scales

STAGES = ["prepare", "train_tokenizer", "extract_latents", "train_transformer", "sample", "train_feature_net",
          "reference_stats", "evaluate", "report"]
CH_MULT = {1: [1], 2: [1, 2], 4: [1, 2, 2], 8: [1, 2, 2, 4], 16: [1, 1, 2, 2, 4]}   # downsampling -> ch_mult
MIN_LATENT = 8   # the committed `long` schedule has 8 steps: a latent side below 8 cannot hold it


@pytest.fixture(scope="module")
def committed(project_root) -> dict:
    return yaml.safe_load((project_root / "params.yaml").read_text())


@pytest.fixture(scope="module")
def stage_keys() -> dict[str, list[str]]:
    """Each dvc.yaml stage's PARAM_KEYS: the sections it reads (and checks)."""
    keys = {name: importlib.import_module(f"pipeline.{name}").PARAM_KEYS for name in STAGES}
    keys["sample"] = keys["sample"] + ["sample.schedules"]   # every sample@D-S stage together: each reads its own schedule
    return keys


def edited(base: dict, **edits) -> dict:
    data = copy.deepcopy(base)
    for key, value in edits.items():
        section, name = key.split("__")
        data[section][name] = value
    return data


def write(tmp_path, data: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("downsample", sorted(CH_MULT))
@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_resolution_and_downsampling_edits_stay_valid(committed, stage_keys, tmp_path, resolution, downsample):
    data = edited(committed, data__resolution=resolution, tokenizer__ch_mult=CH_MULT[downsample])
    path = write(tmp_path, data)
    latent = resolution // downsample
    if latent >= MIN_LATENT:
        params = load_params(path)                      # every section: what `flexvar check` validates
        assert params.latent_size == latent
        for stage, keys in stage_keys.items():
            assert load_params(path, uses=keys).latent_size == latent, stage
        n, f = latent, downsample
        canonical = spec_scales(params.sample.schedules["canonical"], (n, n), f)
        assert canonical[-1] == (n, n)                                  # ends at the full latent
        assert schedule_size(params, "large") == (2 * resolution, 2 * resolution)   # stays beyond training
        assert spec_scales(params.sample.schedules["large"], (n, n), f)[-1] == (2 * n, 2 * n)
        return
    # too small a latent for some schedule: only the stages that read it stop, naming both keys
    for stage in ("prepare", "train_tokenizer", "extract_latents", "train_feature_net", "reference_stats",
                  "evaluate"):
        load_params(path, uses=stage_keys[stage])
    with pytest.raises(ConfigError) as exc:
        load_params(path, uses=stage_keys["sample"])
    lines = str(exc.value).splitlines()
    assert lines and all(line.startswith(f"{path}: sample.schedules.") for line in lines)
    assert all("data.resolution" in line and "tokenizer.ch_mult" in line for line in lines)
    assert len({line.split(" = ")[0] for line in lines}) == len(lines)   # each key once


def test_old_main_failures_are_now_valid(committed):
    """The edits that stopped every stage (prepare included) on main at 44e22d1 with
    `sample.schedules.canonical.scales = [1, 2, 3, 4, 5, 6, 8]: must end at the full latent size N`."""
    for edits in ({"data__resolution": 32}, {"data__resolution": 64}, {"data__resolution": 24},
                  {"data__resolution": 48}, {"tokenizer__ch_mult": [1]}):
        load_params_dict(edited(committed, **edits))


def test_a_conflicting_pair_is_one_error_naming_both_keys_and_only_where_read(committed, stage_keys, tmp_path):
    data = edited(committed, data__resolution=64)
    data["sample"]["schedules"]["canonical"] = {"scales": [1, 2, 3, 4, 5, 6, 8]}   # absolute: ends at 8, latent 32
    path = write(tmp_path, data)
    for stage in ("sample", "report"):
        with pytest.raises(ConfigError) as exc:
            load_params(path, uses=stage_keys[stage])
        (line,) = str(exc.value).splitlines()
        assert line.startswith(f"{path}: sample.schedules.canonical.scales = [1, 2, 3, 4, 5, 6, 8]: ")
        assert "data.resolution 64" in line and "tokenizer.ch_mult [1, 2]" in line and "32" in line
    for stage in ("prepare", "train_tokenizer", "extract_latents", "train_transformer", "evaluate"):
        assert load_params(path, uses=stage_keys[stage]).data.resolution == 64


def test_prepare_ignores_a_sample_schedule_problem_that_the_sample_stage_reports(committed, stage_keys, tmp_path):
    data = copy.deepcopy(committed)
    data["sample"]["schedules"]["long"] = {"steps": 9}   # 9 steps on an 8x8 latent
    path = write(tmp_path, data)
    assert load_params(path, uses=stage_keys["prepare"]).data.resolution == 16
    with pytest.raises(ConfigError, match=r"sample.schedules.long.steps = 9: .*data.resolution 16"):
        load_params(path, uses=stage_keys["sample"])


def test_divisibility_conflict_is_reported_by_tokenizer_stages_only(committed, stage_keys, tmp_path):
    path = write(tmp_path, edited(committed, data__resolution=18, tokenizer__ch_mult=[1, 2, 2]))
    load_params(path, uses=stage_keys["prepare"])
    for stage in ("train_tokenizer", "extract_latents"):
        with pytest.raises(ConfigError) as exc:
            load_params(path, uses=stage_keys[stage])
        (line,) = str(exc.value).splitlines()
        assert "data.resolution = 18" in line and "tokenizer.ch_mult [1, 2, 2]" in line


def test_renamed_sampling_keys_say_their_new_name(committed):
    for old, new in (("cfg", "guidance"), ("cfg_schedule", "guidance_schedule")):
        data = copy.deepcopy(committed)
        data["sample"][old] = data["sample"].pop(new)
        with pytest.raises(ConfigError) as exc:
            load_params_dict(data)
        value = data["sample"][old]
        assert str(exc.value) == f"params.yaml: sample.{old} = {value!r}: renamed: write sample.{new} instead"
