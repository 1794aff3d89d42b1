"""Convert the official FlexVAR release files into this project's checkpoint format.

Tokenizer: FlexVAE.pth holds `{'model': state_dict}` in LlamaGen's VQ layout (`encoder.*`,
`decoder.*`, `quant_conv.*`, `post_quant_conv.*`, `quantize.embedding.weight`, plus a
`quantize.codebook_used` usage buffer that is not a weight). Our `VQVAE` uses the same names,
so conversion = infer the architecture from tensor shapes, drop the buffer, load strictly,
save with the inferred config — including LlamaGen's 32 GroupNorm groups at every width, so the
imported model computes the official function at any base width; a layout the official code
could not have built (a norm width not divisible by 32, widths not ch * mult) is refused.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from flexvar.checkpoint import CheckpointError
from flexvar.config import TokenizerConfig

TOKENIZER_NOT_WEIGHTS = ("quantize.codebook_used",)
OFFICIAL_NORM_GROUPS = 32   # LlamaGen tokenizer_image/vq_model.py Normalize: GroupNorm(num_groups=32) at every width


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint (`{'model': sd}` or a bare state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):   # LlamaGen-style files carry their args
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a usable checkpoint"
        raise CheckpointError(f"official checkpoint {path} cannot be read safely: {str(e).splitlines()[0][:200]}") from e
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"official checkpoint {path} holds no state dict under 'model'")
    return sd


def infer_tokenizer_config(sd: dict[str, torch.Tensor], origin: str = "state dict") -> TokenizerConfig:
    """Architecture of a LlamaGen-layout VQ model from its tensor shapes."""
    def shape(key: str) -> torch.Size:
        if key not in sd:
            raise CheckpointError(f"{origin}: missing {key!r}; not a LlamaGen/FlexVAR VQ tokenizer")
        return sd[key].shape

    ch = shape("encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    if not levels or not blocks:
        raise CheckpointError(f"{origin}: no encoder.conv_blocks.*; not a LlamaGen/FlexVAR VQ tokenizer")
    widths = [shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in levels]
    if any(w % ch for w in widths):
        raise CheckpointError(f"{origin}: stage widths {widths} are not multiples of the base width {ch}; "
                              f"this layout cannot be represented (LlamaGen widths are ch * ch_mult)")
    norm_widths = sorted({int(v.shape[0]) for k, v in sd.items() if re.search(r"norm[^.]*\.weight$", k)})
    odd = [c for c in norm_widths if c % OFFICIAL_NORM_GROUPS]
    if odd:
        raise CheckpointError(f"{origin}: GroupNorm layers of {odd} channels cannot hold LlamaGen's "
                              f"{OFFICIAL_NORM_GROUPS} groups; not an official-layout tokenizer, refused")
    codebook_size, codebook_dim = shape("quantize.embedding.weight")
    return TokenizerConfig(ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=len(blocks),
                           z_channels=shape("encoder.conv_out.weight")[0],
                           codebook_dim=codebook_dim, codebook_size=codebook_size,
                           norm_groups=OFFICIAL_NORM_GROUPS, norm_min_group_channels=1)


def import_official_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """FlexVAE.pth -> `out_dir/tokenizer.pt` loadable with `load_tokenizer`. Returns the written file."""
    from flexvar.tokenizer.vqvae import VQVAE, save_tokenizer

    sd = {k: v for k, v in read_official(path).items() if k not in TOKENIZER_NOT_WEIGHTS}
    cfg = infer_tokenizer_config(sd, origin=str(path))
    model = VQVAE(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"official checkpoint {path} does not fit the inferred architecture {cfg}: "
                              f"{str(e).splitlines()[0][:300]}") from e
    return save_tokenizer(model, cfg, out_dir, extra={"source": f"official:{Path(path).name}"})


# --------------------------------------------------------------------------- transformer
# Official FlexVAR transformer keys -> ours (flexvar/transformer/model.py). `attn_bias_for_masking` is
# the training mask of one fixed schedule and `zero_k_bias` a constant: neither is a weight.
TRANSFORMER_NOT_WEIGHTS = re.compile(r"^(attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")
TRANSFORMER_RENAMES = [
    (r"^pos_1LC$", "pos_1CPP"),
    (r"^head_nm\.ada_lin\.1\.", "head_ada_lin."),
    (r"^(blocks\.\d+)\.ada_lin\.1\.", r"\1.ada_lin."),
    (r"^(blocks\.\d+)\.attn\.scale_mul_1H11$", r"\1.attn.log_scale_1H11"),
    (r"^(blocks\.\d+)\.attn\.mat_qkv\.", r"\1.attn.qkv."),
    (r"^(blocks\.\d+)\.ffn\.", r"\1.mlp."),
]


def read_official_transformer(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The transformer state dict of an official file: bare, `{'trainer': {'var_wo_ddp': sd}}` or `{'model': sd}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a usable checkpoint"
        raise CheckpointError(f"official checkpoint {path} cannot be read safely: {str(e).splitlines()[0][:200]}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("trainer"), dict):
        ckpt = ckpt["trainer"].get("var_wo_ddp")
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"official checkpoint {path} holds no transformer state dict")
    return ckpt


def convert_official_transformer(sd: dict[str, torch.Tensor], origin: str = "state dict"):
    """(TransformerConfig, vocab, codebook_dim, num_classes, pe_size, our state dict) from official shapes."""
    from flexvar.config import TransformerConfig

    out = {}
    for key, value in sd.items():
        if TRANSFORMER_NOT_WEIGHTS.match(key):
            continue
        for pattern, repl in TRANSFORMER_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    need = ["word_embed.weight", "class_emb.weight", "head.weight", "pos_1CPP", "blocks.0.attn.log_scale_1H11",
            "blocks.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in out]
    if missing:
        raise CheckpointError(f"{origin}: missing {missing}; not a FlexVAR transformer with l2-normalised attention")
    width, codebook_dim = out["word_embed.weight"].shape
    depth = len({int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.", k))})
    cfg = TransformerConfig(depth=depth, width=width, heads=out["blocks.0.attn.log_scale_1H11"].shape[1],
                            mlp_ratio=out["blocks.0.mlp.fc1.weight"].shape[0] / width)
    return (cfg, out["head.weight"].shape[0], codebook_dim, out["class_emb.weight"].shape[0] - 1,
            out["pos_1CPP"].shape[-1], out)


def import_official_transformer(path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                                latent_hw: tuple[int, int] = (16, 16)) -> Path:
    """FlexVARd*.pth -> `out_dir/flexvar.pt` (load_flexvar), referring to an imported tokenizer folder.

    Depth, width, heads, MLP ratio, vocabulary, classes and the position-map size come from the
    tensor shapes; `latent_hw` is the training latent (256 px / 16 for the released models).
    """
    from flexvar.checkpoint import file_sha256
    from flexvar.tokenizer.vqvae import load_tokenizer, tokenizer_path
    from flexvar.transformer.model import FlexVAR
    from flexvar.transformer.checkpoint import save_flexvar

    cfg, vocab, cdim, classes, pe, sd = convert_official_transformer(read_official_transformer(path), str(path))
    model = FlexVAR(cfg, vocab, cdim, classes, pe)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"official checkpoint {path} does not fit the inferred architecture {cfg}: "
                              f"{str(e).splitlines()[0][:300]}") from e
    tok_file = tokenizer_path(tokenizer_dir)
    downsample, sha = 16, ""
    if tok_file.is_file():
        tok = load_tokenizer(tokenizer_dir)
        if (tok.quantize.codebook_size, tok.quantize.codebook_dim) != (vocab, cdim):
            raise CheckpointError(f"tokenizer {tokenizer_dir} has {tok.quantize.codebook_size} codes of dim "
                                  f"{tok.quantize.codebook_dim}; the transformer expects {vocab} of dim {cdim}")
        downsample, sha = tok.downsample, file_sha256(tok_file)
    return save_flexvar(out_dir, model, latent_hw=latent_hw, downsample=downsample, tokenizer_dir=str(tokenizer_dir),
                        tokenizer_sha256=sha, extra={"source": f"official:{Path(path).name}", "prediction": "gt"})
