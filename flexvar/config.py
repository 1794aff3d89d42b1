"""Typed, validated view of params.yaml — the only place settings live.

`load_params()` reads params.yaml into `Params`; anything wrong (unknown key, wrong type,
out-of-range value, inconsistent sections) raises `ConfigError` naming the key path and the
bad value before any work starts:

    >>> load_params_dict({"train_tokenizer": {"lr": -1}})
    Traceback (most recent call last):
    ...
    flexvar.config.ConfigError: params.yaml: train_tokenizer.lr = -1: Input should be greater than 0

The field defaults ARE the committed params.yaml's values (tests/test_config.py fails on any
difference). Settings of different sections that cannot work together (`Params.problems`, e.g.
a schedule longer than the latent) name every key involved and are reported only to the stages
that read the section (`load_params(path, uses=PARAM_KEYS)`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from flexvar.errors import FlexvarError
from flexvar.schedules import CANONICAL, PRESETS, RELATIVE_SIZE, sampler_problems, spec_problem


class ConfigError(FlexvarError, ValueError):
    """params.yaml (or a preset/override) is invalid; the message names the key path and value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data
class DataConfig(Section):
    source: str = "builtin:icons"            # builtin:<name> | hf:<id>[:<config>] | imagefolder:<path>
    resolution: int = Field(16, ge=8)       # output images are resolution x resolution RGB
    num_train: int = Field(3000, ge=1)      # builtin only: images in the train split
    num_val: int = Field(400, ge=1)         # builtin only: images in the val split
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # imagefolder/hf without a val split
    image_column: str = "image"             # hf only
    label_column: str = "label"             # hf only
    hf_split_train: str = "train"
    hf_split_val: str = "validation"
    on_bad_image: Literal["skip", "fail"] = "skip"
    upscale_small: bool = True              # images smaller than resolution: resize up as the official code does, or skip
    augment: Literal["center", "official"] = "center"   # training views: centre crop + its flip | official random crop + flip
    augment_views: int = Field(10, ge=1)    # official: augmented views cached per image (LlamaGen: ten crops)
    num_workers: int = Field(0, ge=0)       # worker processes: prepare's decode/clean/encode, DataLoader decoding
    in_memory_mb: float = Field(256, ge=0)  # splits whose pixels fit in this many MB are decoded once into RAM;
                                            # larger ones stream from disk (0 = always stream)
    latent_dtype: Literal["float32", "float16"] = "float32"   # latent cache storage (float16: half the disk/page cache)

    @field_validator("source")
    @classmethod
    def _source_kind(cls, v: str) -> str:
        kind, _, rest = v.partition(":")
        if kind not in {"builtin", "hf", "imagefolder"} or not rest:
            raise ValueError("must be builtin:<name>, hf:<dataset id>[:<config>] or imagefolder:<path>")
        return v


# --------------------------------------------------------------------------- models
class TokenizerConfig(Section):
    """Scalable VQVAE (LlamaGen encoder/decoder layout); downsampling = 2**(len(ch_mult)-1)."""
    ch: int = Field(16, ge=1)
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    num_res_blocks: int = Field(1, ge=1)
    z_channels: int = Field(64, ge=1)
    codebook_dim: int = Field(32, ge=1)      # Cvae
    codebook_size: int = Field(1024, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = Field(0.25, ge=0.0)        # commitment weight
    entropy_weight: float = Field(0.05, ge=0.0)
    # GroupNorm of a layer with C channels: gcd(norm_groups, max(1, C // norm_min_group_channels)) groups.
    # 32 / 1 is LlamaGen's and FlexVAE's (32 groups at every width divisible by 32); the embedded
    # default keeps >= 4 channels per group at its 16-channel width (see README, "Embedded deviations").
    norm_groups: int = Field(32, ge=1)
    norm_min_group_channels: int = Field(4, ge=1)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def groups(self, channels: int) -> int:
        """GroupNorm groups of a layer with `channels` channels (always divides `channels`)."""
        return math.gcd(self.norm_groups, max(1, channels // self.norm_min_group_channels))


class TransformerConfig(Section):
    """FlexVAR transformer; width/heads/drop_path default to 64*depth, depth, 0.1*depth/24."""
    depth: int = Field(4, ge=1)
    width: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    attn_drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_rate: float | None = Field(None, ge=0.0, lt=1.0)
    class_dropout: float = Field(0.1, ge=0.0, le=1.0)
    prediction: Literal["gt", "residual"] = "gt"
    pos_embed: Literal["scalable", "fixed"] = "scalable"
    pos_embed_learnable: bool = True
    attention: Literal["auto", "plain", "sdpa", "flex"] = "auto"   # auto: plain on CPU, flex (block-sparse) on CUDA
    adaln_gamma_init: float = Field(1e-5, ge=0.0)   # AdaLN gamma weights x this at init (official scripts: 1e-3 d16/d20, 1e-4 d24)
    pos_embed_size: int | None = Field(None, ge=1)   # P of the P x P position map; null = the training latent's long side (official 32)
    pos_embed_init: Literal["halves", "interleaved"] = "halves"   # sin-cos layout; interleaved = official (sin rows / cos cols)
    pos_embed_grow: Literal["area", "bicubic"] = "area"   # resize of the position map to scales above it (official: area)


class ScheduleConfig(Section):
    """Training step sampler (paper §4.1); what the Ray Tune sweep searches.

    A sampled schedule is `head` + `count` scales drawn without replacement from each
    `[count, low, high]` group + the full latent size n; with probability `canonical_prob` the
    canonical schedule is used instead. Then one uniform draw u drops k random intermediate
    steps (never the head) where k = #{i : u < drop_probs[i]} capped at `max_drops`
    (drop_probs is non-increasing: P(at least i+1 drops)). While the schedule holds more than
    `max_tokens` tokens a random step among the last `overflow_window` is dropped (the full
    scale too unless `overflow_keeps_full`), then at most `max_steps` are kept.

    Left null, `canonical`, `groups` and `max_tokens` follow the full latent size n: at n=16
    they are exactly the official sampler's (1,2,3,4,5,6,8,10,13,16 / 5 of 3..10 + 2 of 11..15 /
    680 tokens); see flexvar/schedules.py `sampler_config(cfg, n)`.
    """
    canonical: list[int] | None = None
    canonical_prob: float = Field(0.05, ge=0.0, le=1.0)
    head: list[int] = Field(default_factory=lambda: [1, 2])
    groups: list[tuple[int, int, int]] | None = None
    drop_probs: list[float] = Field(default_factory=lambda: [0.10, 0.05, 0.02, 0.01])
    max_drops: int = Field(4, ge=0)
    max_steps: int = Field(10, ge=2)
    max_tokens: int | None = Field(None, ge=1)
    overflow_window: int = Field(4, ge=1)
    overflow_keeps_full: bool = False

    @field_validator("canonical", "head")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            check_increasing(v)
        return v

    @field_validator("drop_probs")
    @classmethod
    def _probs(cls, v: list[float]) -> list[float]:
        for p in v:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"probability {p} is outside [0, 1]")
        if any(b > a for a, b in zip(v, v[1:])):
            raise ValueError("must be non-increasing: drop_probs[i] is the probability of at least i+1 drops")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[tuple[int, int, int]] | None) -> list[tuple[int, int, int]] | None:
        for count, low, high in v or []:
            if count < 0 or low < 1 or high < low or count > high - low + 1:
                raise ValueError(f"group [{count}, {low}, {high}] must have 1 <= low <= high and "
                                 f"0 <= count <= high - low + 1")
        return v




# --------------------------------------------------------------------------- training
class OptimConfig(Section):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)                  # global: workers x micro_batch x accumulation steps
    # images per device per forward; the accumulation steps are derived (flexvar/distributed.py split_batch).
    # auto: transformer = the largest dividing batch_size / workers that fits the device (train_memory.py);
    # tokenizer = each worker's whole share (no accumulation)
    micro_batch: int | Literal["auto"] = "auto"
    lr: float = Field(3e-4, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)   # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0.0)              # 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)      # 0 = no EMA weights
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)

    @field_validator("micro_batch")
    @classmethod
    def _micro(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive number of images per device, or auto")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas {list(v)} must each be in [0, 1)")
        return v


class TrainTokenizerConfig(OptimConfig):
    steps: int = Field(2000, ge=1)
    lr: float = Field(6e-3, gt=0.0)
    checkpoint_every: int = Field(50, ge=1)
    num_scales: int = Field(5, ge=1)                  # K scales per batch (paper K=5), full size always in
    recon_loss: Literal["l1", "l2", "l1+l2"] = "l1+l2"
    perceptual_weight: float = Field(0.0, ge=0.0)     # 0 = off
    perceptual_weights_path: str = ""                 # local VGG16 weights file for the perceptual loss
    gan_weight: float = Field(0.0, ge=0.0)            # 0 = off
    gan_start_step: int = Field(0, ge=0)
    val_images: int = Field(256, ge=1)


class TrainTransformerConfig(OptimConfig):
    steps: int = Field(400, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    checkpoint_every: int = Field(50, ge=1)
    eval_every: int = Field(50, ge=1)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    lr_schedule: Literal["cosine", "lin0"] = "cosine"   # lin0: the official FlexVAR/VAR schedule (min_lr_ratio = its wpe)
    compile: bool = False
    compile_bucket: int = Field(128, ge=0)   # compiled: pad sequences to a multiple of this; 0 = dynamic shapes
    val_batches: int = Field(4, ge=1)


# --------------------------------------------------------------------------- sampling, evaluation
class ScheduleSpec(Section):
    """One inference schedule, written so it follows data.resolution and the tokenizer's downsampling.

    Exactly one of: `steps` (to the output's latent), `scales` (ints: latent sides ending at the
    output's long latent side; floats: fractions of it in [0, 1] ending at 1.0), `preset` (a Tab. 7
    name, e.g. "256-10", or "canonical": the canonical schedule of the output's latent). `size`:
    output H, W as pixels or relative to the training size ("2x", or per side [1x, 2x]); default
    the training resolution. How each form becomes scales: flexvar/schedules.py `spec_scales`.
    """
    steps: int | None = Field(None, ge=1)
    scales: list[int] | list[float] | None = None
    preset: str | None = None
    size: tuple[int | str, int | str] | None = None

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v, v]
        for side in v if isinstance(v, (list, tuple)) else []:
            if isinstance(side, str) and not RELATIVE_SIZE.match(side):
                raise ValueError(f"{side!r}: a side is pixels (an int) or relative to the training size, e.g. 2x")
            if isinstance(side, int) and side < 1:
                raise ValueError(f"{side}: pixels must be positive")
        return v

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        if v is not None and v != CANONICAL and v not in PRESETS:
            raise ValueError(f"unknown preset; known: {CANONICAL}, {', '.join(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _one_way(self) -> "ScheduleSpec":
        given = [k for k in ("steps", "scales", "preset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of steps, scales, preset (got {given or 'none'})")
        if self.scales is not None and any(isinstance(s, float) for s in self.scales):
            if any(not 0.0 <= f <= 1.0 for f in self.scales) or self.scales[-1] != 1.0 or any(
                    b <= a for a, b in zip(self.scales, self.scales[1:])):
                raise ValueError(f"scale fractions {self.scales} must increase within [0, 1] and end at 1.0")
        elif self.scales is not None:
            check_increasing(self.scales)
        return self


class SamplingSettings(Section):
    """How each token is drawn: the one object generation takes (flexvar.generation.generate) and
    every caller records as it is (the sample stage's info.json, evaluate's FID protocol, the CLI)."""
    guidance: float = Field(1.5, ge=0.0)          # classifier-free guidance scale t (0 = off)
    guidance_schedule: Literal["ramp", "constant"] = "ramp"
    top_k: int = Field(10, ge=0)                  # 0 = off, 1 = greedy
    top_p: float = Field(0.0, ge=0.0, le=1.0)     # 0 = off
    # official: greedy (top-k 1) at every scale outside FlexVAR's sampled list [1,2,3,4,5,6,8,10,13,16,23,24,32]
    # and above the training latent (where guidance is full); outside: greedy only above the training latent;
    # none: top-k/top-p at every scale. The CLI's --greedy-rule defaults to the same value.
    greedy_rule: Literal["official", "outside", "none"] = "official"
    precision: Literal["auto", "fp32", "bf16"] = "auto"


RENAMED = {"cfg": "guidance", "cfg_schedule": "guidance_schedule"}   # old sample.* key -> new


class SampleConfig(SamplingSettings):
    per_class: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    max_memory_gb: float = Field(16.0, gt=0.0)   # refuse a generation whose estimated peak is above this
    schedules: dict[str, ScheduleSpec] = Field(default_factory=lambda: {
        "short": ScheduleSpec(steps=4), "canonical": ScheduleSpec(preset=CANONICAL),
        "long": ScheduleSpec(steps=8), "large": ScheduleSpec(steps=8, size="2x")})

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        for old, new in RENAMED.items():
            if isinstance(data, dict) and old in data:
                raise _at(("sample", old), data[old], f"renamed: write sample.{new} instead")
        return data

    @property
    def sampling(self) -> SamplingSettings:
        """The sampling settings of this section, as the object generation takes."""
        return SamplingSettings(**{k: getattr(self, k) for k in SamplingSettings.model_fields})


class EvaluateConfig(Section):
    feature_space: Literal["domain", "inception"] = "domain"
    inception_weights: str = ""           # local path of torch-fidelity's inception-v3-compat weights
    # local imagenet_2012_challenge_label_map_proto.pbtxt (shipped in the same inception-2015-12-05.tgz as the
    # weights): maps Inception's 1008 logits to ImageNet's 1000 classes for class_acc_inception; "" = skip it
    inception_label_map: str = ""
    metrics: list[Literal["fid", "isc", "kid", "prc"]] = Field(default_factory=lambda: ["fid", "isc", "kid", "prc"])
    reference_split: Literal["train", "val"] = "val"
    # "" = the prepared reference_split; adm:<file.npz> = the ADM evaluator's reference batch (mu/sigma of
    # Inception pool features, e.g. VIRTUAL_imagenet256_labeled.npz: FID and IS only); folder:<dir> = images of one size
    reference: str = ""
    kid_subset_size: int = Field(100, ge=2)
    feature_net_steps: int = Field(300, ge=1)
    feature_net_batch_size: int = Field(64, ge=1)
    feature_net_lr: float = Field(3e-3, gt=0.0)
    bootstrap_samples: int = Field(1000, ge=0)    # replicates for the 95% intervals of FID / class accuracy; 0 = none


    @field_validator("reference")
    @classmethod
    def _reference_kind(cls, v: str) -> str:
        kind, _, rest = v.partition(":")
        if v and (kind not in {"adm", "folder"} or not rest):
            raise ValueError("must be empty (the prepared reference_split), adm:<reference batch .npz> or folder:<dir>")
        return v


class VariantsConfig(Section):
    depths: list[int] = Field(default_factory=lambda: [2, 4], min_length=1)
    schedules: list[str] = Field(default_factory=lambda: ["short", "canonical", "long", "large"], min_length=1)


class TrackingConfig(Section):
    uri: str = ""                         # empty = MLFLOW_TRACKING_URI, else the embedded SQLite store
    experiment: str = "flexvar"
    required: bool = True                 # unreachable server: fail (true) or run untracked (false)


class StageResources(Section):
    # unset: under the flow a single-process stage takes a whole node's CPUs (the threads `dvc repro`
    # gives it, so both routes compute the same bytes) and each Ray Train worker 1 (torchrun's 1 thread)
    num_cpus: float | None = Field(None, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)


class ResourcesConfig(Section):
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    num_threads: int = Field(0, ge=0)     # torch CPU threads; 0 = torch default
    ray_address: str = ""                 # empty = start Ray locally
    ray_num_cpus: int = Field(0, ge=0)    # local Ray only: CPUs it may use; 0 = all
    # data-parallel training processes; auto = the GPUs visible (1 without a GPU): `dvc repro` launches them
    # with torchrun inside the stage, the flow as Ray Train workers (num_gpus per worker: stages.<stage>)
    train_workers: int | Literal["auto"] = 1
    parallelism: Literal["ddp", "fsdp"] = "ddp"   # multi-worker training: DDP, or FSDP2 sharding (transformer)
    retries: int = Field(1, ge=0)
    retry_delay_s: float = Field(5.0, ge=0.0)
    stages: dict[str, StageResources] = Field(default_factory=dict)

    @field_validator("train_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive number of workers, or auto")
        return v

    def for_stage(self, stage: str) -> StageResources:
        """Resources of a dvc.yaml stage: its own entry ("train_transformer@d2"), else its matrix
        group's ("train_transformer"), else the default (num_cpus unset, no GPU)."""
        return self.stages.get(stage) or self.stages.get(stage.split("@")[0]) or StageResources()


def _default_panel() -> dict[str, "ScheduleSpec"]:
    """The sample stage's default schedules plus an uneven scale list and a 1:2 aspect: the sweep's panel."""
    return {**SampleConfig().schedules, "uneven": ScheduleSpec(scales=[0.0, 0.375, 0.625, 1.0]),
            "wide": ScheduleSpec(steps=6, size=("1x", "2x"))}


class SweepConfig(Section):
    """Ray Tune sweep of the training step sampler (flows/sweep.py).

    A trial's score (`metric`, default `val_loss_panel`) is the mean val loss over `eval_panel`:
    inference schedules named and written like `sample.schedules` (fewer and more steps than
    canonical, uneven scale lists, sizes/aspects beyond the training latent), so a winner is good
    at every schedule, not only the canonical one. `search_space` maps dotted settings (list items
    by index, e.g. `schedule.groups.0.0`) to [low, high]; the sweep fills null sampler settings
    (canonical, groups, max_tokens) for the latent size first, so they can be searched.
    """
    num_samples: int = Field(4, ge=1)
    steps: int = Field(60, ge=1)
    grace_steps: int = Field(20, ge=1)
    report_every: int = Field(10, ge=1)       # steps between a trial's val evaluations (ASHA decides there)
    metric: str = "val_loss_panel"
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    max_failures: int = Field(2, ge=0)
    # every configuration is trained once per seed (model init, data order, step draws); Tune sees the
    # mean over seeds as `metric` and its s.d. as `<metric>_std`, so a winner is told from seed noise
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    eval_panel: dict[str, ScheduleSpec] = Field(default_factory=_default_panel, min_length=1)
    search_space: dict[str, list[float]] = Field(default_factory=lambda: {
        "schedule.canonical_prob": [0.0, 0.5], "schedule.drop_probs.0": [0.1, 0.6],
        "schedule.drop_probs.1": [0.03, 0.1], "schedule.drop_probs.2": [0.01, 0.03],
        "schedule.groups.0.0": [0, 3], "schedule.groups.1.0": [0, 2]})

    @field_validator("search_space")
    @classmethod
    def _ranges(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for key, rng in v.items():
            if len(rng) != 2 or rng[0] > rng[1]:
                raise ValueError(f"{key}: {rng} must be [low, high] with low <= high")
        return v


# --------------------------------------------------------------------------- root
class Params(Section):
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    transformer: TransformerConfig = Field(default_factory=TransformerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train_tokenizer: TrainTokenizerConfig = Field(default_factory=TrainTokenizerConfig)
    train_transformer: TrainTransformerConfig = Field(default_factory=TrainTransformerConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    variants: VariantsConfig = Field(default_factory=VariantsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @property
    def latent_size(self) -> int:
        return self.data.resolution // self.tokenizer.downsample

    def problems(self) -> list[Problem]:
        """Settings of different keys that cannot work together (each problem names every key involved).

        Each belongs to the section that reads it (`Problem.owner`): a stage checks only the
        sections it uses (`load_params(..., uses=PARAM_KEYS)`), so e.g. `prepare` never stops
        on a sample schedule. Schedules written relative to the latent (steps, fractions,
        preset canonical, size 2x) follow data.resolution and the tokenizer's downsampling.
        """
        f, res, ch_mult = self.tokenizer.downsample, self.data.resolution, self.tokenizer.ch_mult
        latent = (f"the full latent side {res // f} = data.resolution {res} / downsampling {f} "
                  f"(tokenizer.ch_mult {ch_mult}: 2**(len-1))")
        out: list[Problem] = []
        if res % f:
            out.append(Problem("tokenizer", ("data", "resolution"), res,
                               f"must be divisible by the tokenizer's downsampling {f} (tokenizer.ch_mult {ch_mult}: "
                               f"2**(len-1)); change data.resolution or tokenizer.ch_mult"))
            return out   # every latent-size check below would repeat this one
        full = res // f
        for key, value, msg in sampler_problems(self.schedule, full):
            out.append(Problem("schedule", ("schedule", *key), value, f"{msg}; {latent}"))
        for section, schedules in ((("sample", "schedules"), self.sample.schedules),
                                   (("sweep", "eval_panel"), self.sweep.eval_panel)):
            for name, spec in schedules.items():
                bad = spec_problem(spec, (full, full), f)
                if bad:
                    loc = (*section, name, bad[0])
                    out.append(Problem(".".join(loc[:3]), loc, _lookup(self.model_dump(mode="json"), loc),
                                       f"{bad[1]}; {latent}"))
        for i, name in enumerate(self.variants.schedules):
            if name not in self.sample.schedules:
                out.append(Problem("variants", ("variants", "schedules", i), name,
                                   f"is not a schedule in sample.schedules ({', '.join(self.sample.schedules)})"))
        width = self.transformer.width or 64 * self.transformer.depth
        heads = self.transformer.heads or self.transformer.depth
        if width % heads:
            out.append(Problem("transformer", ("transformer", "heads"), heads,
                               f"must divide the width {width} (transformer.width, default 64 * depth)"))
        return out

    def transformer_for_depth(self, depth: int) -> TransformerConfig:
        """The transformer section with `depth` set (variants.depths) and derived sizes left to defaults."""
        return self.transformer.model_copy(update={"depth": depth})


class Problem(NamedTuple):
    """Settings that cannot work together: `loc`/`value` the key reported, `msg` names the other key(s)."""
    owner: str        # the dotted section that reads it: only stages using that section report it
    loc: tuple
    value: Any
    msg: str


def _uses(owner: str, uses: list[str] | None) -> bool:
    """Whether a stage reading the dotted keys `uses` (None = every key) reads the section `owner`."""
    return uses is None or any(owner == u or owner.startswith(u + ".") or u.startswith(owner + ".") for u in uses)


def check_params(params: Params, uses: list[str] | None = None, origin: str = "params.yaml") -> Params:
    """Raise one ConfigError listing, one line each, every problem of the sections in `uses` (None = all)."""
    lines = [_format(p.loc, p.value, p.msg, origin) for p in params.problems() if _uses(p.owner, uses)]
    if lines:
        raise ConfigError("\n".join(lines))
    return params


class _PathError(ValueError):
    def __init__(self, loc: tuple, value: Any, msg: str):
        super().__init__(msg)
        self.loc, self.value, self.msg = loc, value, msg


def _at(loc: tuple, value: Any, msg: str) -> _PathError:
    return _PathError(loc, value, msg)


def check_increasing(scales: list[int]) -> None:
    if not scales or scales[0] < 1:
        raise ValueError(f"{scales} must be non-empty positive scales")
    if any(b <= a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"{scales} is not strictly increasing")


# --------------------------------------------------------------------------- loading
def _lookup(data: Any, loc: tuple) -> Any:
    for k in loc:
        try:
            data = data[k]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _format(loc: tuple, value: Any, msg: str, origin: str) -> str:
    path = ".".join(str(p) for p in loc) or "(root)"
    return f"{origin}: {path} = {value!r}: {msg}"


def load_params_dict(data: dict[str, Any] | None, origin: str = "params.yaml",
                     uses: list[str] | None = None) -> Params:
    """Validate a params mapping; ConfigError lists each bad key path with its value.

    Every key is checked; settings that conflict across keys (`Params.problems`) only for the
    sections a stage reads: `uses` is its dotted keys (a stage's PARAM_KEYS), None = all.
    """
    data = data or {}
    try:
        return check_params(Params.model_validate(data), uses, origin)
    except _PathError as e:
        raise ConfigError(_format(e.loc, e.value, e.msg, origin)) from None
    except ValidationError as e:
        lines = []
        for err in e.errors():
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, _PathError):
                lines.append(_format(ctx_err.loc, ctx_err.value, ctx_err.msg, origin))
                continue
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see params.yaml for the valid keys)"
            lines.append(_format(loc, _lookup(data, loc) if err["type"] != "missing" else None, msg, origin))
        raise ConfigError("\n".join(lines)) from None


def load_params(path: str | os.PathLike = "params.yaml", uses: list[str] | None = None) -> Params:
    """Read and validate params.yaml (cross-key conflicts only of the sections in `uses`; None = all)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the params file (params.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project root or pass the params file path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return load_params_dict(data, origin=str(path), uses=uses)


def select(params: Params, keys: list[str]) -> dict[str, Any]:
    """The values of dotted keys (e.g. 'train_tokenizer.lr', 'tokenizer'), flattened: what a stage depends on."""
    out: dict[str, Any] = {}
    dumped = params.model_dump(mode="json")
    for key in keys:
        value = _lookup(dumped, tuple(key.split(".")))
        if isinstance(value, dict):
            out.update(_flatten(value, key))
        else:
            out[key] = value
    return out


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out
