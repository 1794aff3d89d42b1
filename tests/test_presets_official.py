"""The paper presets (d16, d20, d24) reproduce the official FlexVAR training and evaluation recipe.

Each row holds a preset value beside the official value it reproduces; the comment names the
official file and line (github.com/jiaosiyu1999/FlexVAR, files under /work/official/FlexVAR).
Derived values show their derivation from the official numbers.
"""
from __future__ import annotations

import pytest
import yaml

from flexvar.config import load_params_dict
from flexvar.presets import PRESETS_DIR, deep_merge
from flexvar.optim import lin0_factor

ITERS_PER_EPOCH = -(-1281167 // 768)   # utils/data_sampler.py:75 ceil(ImageNet train / global batch 768)

# depth -> (epochs, tblr, alng, wpe): scripts/train.sh (d24 line 6, d20 line 12, d16 line 18 — that line
# says --depth=20 but is the d16 run: ep 180 is the d16 schedule), tblr default utils/arg_util.py:50
PER_DEPTH = {16: (180, 1e-4, 1e-3, 0.1), 20: (250, 1e-4, 1e-3, 0.1), 24: (350, 8e-5, 1e-4, 0.01)}

COMMON = [   # (dotted key, official value)
    ("tokenizer.codebook_size", 8912),              # train.py:83, eval_c2i.py:59 V=8912 (paper §4.1)
    ("tokenizer.codebook_dim", 32),                 # train.py:84 Cvae=32
    ("tokenizer.ch", 128),                          # models/vq_llama.py:105 Encoder ch=128 (VQ-16)
    ("tokenizer.ch_mult", [1, 1, 2, 2, 4]),         # models/vq_llama.py:21 encoder_ch_mult
    ("tokenizer.num_res_blocks", 2),                # models/vq_llama.py:105 num_res_blocks=2
    ("tokenizer.z_channels", 256),                  # models/vq_llama.py:23
    ("tokenizer.norm_groups", 32),                  # models/vq_llama.py Normalize: GroupNorm(num_groups=32)
    ("tokenizer.norm_min_group_channels", 1),       # (32 groups at every width)
    ("transformer.class_dropout", 0.1),             # models/__init__.py:40 cond_drop_rate=0.1
    ("transformer.drop_path_rate", None),           # models/__init__.py:22 dpr = 0.1 * depth / 24 (our null)
    ("transformer.pos_embed_grow", "area"),         # models/flexvar.py:193 F.interpolate(..., mode='area')
    ("transformer.pos_embed_size", 32),             # models/flexvar.py:70 generate_2d_rotary_position_embedding(h=32, w=32)
    ("transformer.pos_embed_init", "interleaved"),  # models/flexvar.py:157-160 even: sin(row), odd: cos(col)
    ("train_transformer.batch_size", 768),          # utils/arg_util.py:57 bs=768; scripts/train.sh --bs=768
    ("train_transformer.label_smoothing", 0.0),     # utils/arg_util.py:55 ls=0.0
    ("train_transformer.grad_clip", 2.0),           # utils/arg_util.py:54 tclip=2.
    ("train_transformer.lr_schedule", "lin0"),      # utils/arg_util.py:67 sche='lin0'
    ("train_transformer.weight_decay", 0.05),       # utils/arg_util.py:52 twd=0.05 (:288 twde = twd: constant)
    ("train_transformer.betas", [0.9, 0.95]),       # train.py:105 AdamW betas=(0.9, 0.95)
    ("schedule.canonical", [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]),   # trainer.py:91
    ("schedule.canonical_prob", 0.05),              # trainer.py:90
    ("schedule.groups", [[5, 3, 10], [2, 11, 15]]), # trainer.py:93 sample(range(3, 11), 5) + sample(range(11, 16), 2)
    ("schedule.max_tokens", 680),                   # trainer.py:114
    ("sample.cfg", 2.5),                            # scripts/evaluate_c2i.sh:16 args_cfg=2.5
    ("sample.cfg_schedule", "ramp"),                # models/flexvar.py:206,221 t = cfg * si / min(n-1, 9)
    ("sample.top_k", 900),                          # scripts/evaluate_c2i.sh:22 --top_k 900
    ("sample.top_p", 0.95),                         # eval_c2i.py:108 top_p=0.95
    ("sample.greedy_rule", "official"),             # models/flexvar.py:230 top_k=1 outside the list / above max_pn
    ("sample.per_class", 50),                       # eval_c2i.py:90 range(1000) * 50
    ("sample.schedules.official9.scales", [1, 2, 3, 4, 5, 7, 10, 13, 16]),   # scripts/evaluate_c2i.sh:15
    ("data.augment", "official"),                   # dataset/imagenet.py:73-74 RandomHorizontalFlip + random_crop_arr
    ("data.upscale_small", True),                   # dataset/augmentation.py:40-47 small images resized up, never skipped
    ("data.augment_views", 10),                     # LlamaGen autoregressive/train/extract_codes_c2i.py:55-60 caches 10 crops
]


def preset(depth: int) -> dict:
    """params.yaml with presets/d{depth}.yaml merged in, validated, as plain data."""
    base = yaml.safe_load((PRESETS_DIR.parent / "params.yaml").read_text())
    merged = deep_merge(base, yaml.safe_load((PRESETS_DIR / f"d{depth}.yaml").read_text()))
    return load_params_dict(merged).model_dump(mode="json")


def value(params: dict, key: str):
    for part in key.split("."):
        params = params[part]
    return params


@pytest.mark.parametrize("depth", sorted(PER_DEPTH))
def test_preset_equals_official_recipe(depth):
    p = preset(depth)
    epochs, tblr, alng, wpe = PER_DEPTH[depth]
    rows = COMMON + [
        ("variants.depths", [depth]),
        ("transformer.adaln_gamma_init", alng),                    # scripts/train.sh --alng
        ("train_transformer.lr", pytest.approx(tblr * 768 / 256)),  # utils/arg_util.py:287 tlr = tblr * bs / 256
        ("train_transformer.min_lr_ratio", wpe),                   # scripts/train.sh --wpe
        ("train_transformer.steps", epochs * ITERS_PER_EPOCH),     # scripts/train.sh --ep x iterations per epoch
        ("train_transformer.warmup_steps", round(epochs / 50 * ITERS_PER_EPOCH)),   # utils/arg_util.py:291 wp = ep/50
    ]
    wrong = [(key, value(p, key), official) for key, official in rows if value(p, key) != official]
    assert not wrong, "preset differs from the official recipe: " + "; ".join(f"{k} = {v!r}, official {o!r}"
                                                                             for k, v, o in wrong)


def test_lin0_follows_the_official_formula():
    # utils/lr_control.py:14-28 with wp0=0.005 (utils/arg_util.py:65): warmup from 0.005, hold 1 for the first
    # 5% of the remaining iterations, then linear to wpe at the last iteration (max_it - 1)
    steps, warmup, wpe = 1000, 100, 0.1
    assert lin0_factor(0, steps, warmup, wpe) == pytest.approx(0.005)
    assert lin0_factor(50, steps, warmup, wpe) == pytest.approx(0.005 + 0.995 * 0.5)
    hold_end = warmup + 0.05 * (steps - 1 - warmup)
    assert lin0_factor(int(hold_end), steps, warmup, wpe) == 1.0
    assert lin0_factor(steps - 1, steps, warmup, wpe) == pytest.approx(wpe)
    mid = warmup + 0.5 * (steps - 1 - warmup)       # pasd 0.5 -> wpe + (1 - wpe) * 0.5 / 0.95
    assert lin0_factor(int(mid), steps, warmup, wpe) == pytest.approx(wpe + (1 - wpe) * (1 - (int(mid) - warmup) / (steps - 1 - warmup)) / 0.95)
