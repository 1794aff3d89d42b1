"""import_official_transformer: a random state dict in the released FlexVAR layout gives the logits
of a direct re-computation of the official forward pass."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flexvar.checkpoint import CheckpointError
from flexvar.official import import_official_transformer
from flexvar.transformer.checkpoint import load_flexvar

DEPTH, C, HEADS, V, CV, NCLS, P = 2, 32, 2, 40, 8, 6, 8


def official_state_dict(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Shapes and names of models/flexvar.py (attn_l2_norm=True, shared_aln=False), random values."""
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"word_embed.weight": r(C, CV), "word_embed.bias": r(C), "class_emb.weight": r(NCLS + 1, C),
          "pos_start": r(1, 1, C), "pos_1LC": r(1, C, P, P), "head_nm.ada_lin.1.weight": r(2 * C, C),
          "head_nm.ada_lin.1.bias": r(2 * C), "head.weight": r(V, C), "head.bias": r(V),
          "attn_bias_for_masking": torch.zeros(1, 1, 30, 30)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {b + "ada_lin.1.weight": r(6 * C, C), b + "ada_lin.1.bias": r(6 * C),
               b + "attn.scale_mul_1H11": r(1, HEADS, 1, 1) + math.log(4), b + "attn.mat_qkv.weight": r(3 * C, C),
               b + "attn.q_bias": r(C), b + "attn.v_bias": r(C), b + "attn.zero_k_bias": torch.zeros(C),
               b + "attn.proj.weight": r(C, C), b + "attn.proj.bias": r(C),
               b + "ffn.fc1.weight": r(4 * C, C), b + "ffn.fc1.bias": r(4 * C),
               b + "ffn.fc2.weight": r(C, 4 * C), b + "ffn.fc2.bias": r(C)}
    return sd


def reference_logits(sd, label_B, x_BLCv, sides):
    """The official teacher-forced forward (eval mode), written out with plain tensor ops."""
    B = label_B.shape[0]
    cond = sd["class_emb.weight"][label_B]
    pos = torch.cat([F.interpolate(sd["pos_1LC"], size=(s, s), mode="area").reshape(1, C, -1).permute(0, 2, 1)
                     for s in sides], 1)
    sos = cond[:, None] + sd["pos_start"]
    x = torch.cat([sos, x_BLCv @ sd["word_embed.weight"].T + sd["word_embed.bias"]], 1) + pos
    L = x.shape[1]
    lvl = torch.cat([torch.full((s * s,), i) for i, s in enumerate(sides)])
    bias = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)
    ln = lambda t: F.layer_norm(t, (C,), eps=1e-6)  # noqa: E731
    for i in range(DEPTH):
        b = f"blocks.{i}."
        mod = F.silu(cond) @ sd[b + "ada_lin.1.weight"].T + sd[b + "ada_lin.1.bias"]
        g1, g2, s1, s2, h1, h2 = mod.view(B, 1, 6, C).unbind(2)
        a_in = ln(x) * (s1 + 1) + h1
        qkv_bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(C), sd[b + "attn.v_bias"]])
        q, k, v = (a_in @ sd[b + "attn.mat_qkv.weight"].T + qkv_bias).view(B, L, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        q = F.normalize(q, dim=-1) * sd[b + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
        k = F.normalize(k, dim=-1)
        att = ((q @ k.transpose(-1, -2)) + bias).softmax(-1) @ v
        att = att.transpose(1, 2).reshape(B, L, C) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        x = x + att * g1
        f_in = ln(x) * (s2 + 1) + h2
        hid = F.gelu(f_in @ sd[b + "ffn.fc1.weight"].T + sd[b + "ffn.fc1.bias"], approximate="tanh")
        x = x + (hid @ sd[b + "ffn.fc2.weight"].T + sd[b + "ffn.fc2.bias"]) * g2
    scale, shift = (F.silu(cond) @ sd["head_nm.ada_lin.1.weight"].T + sd["head_nm.ada_lin.1.bias"]).view(B, 1, 2, C).unbind(2)
    return (ln(x) * (scale + 1) + shift) @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize("wrap", ["raw", "trainer"])
def test_imported_transformer_matches_reference(tmp_path, wrap):
    g = torch.Generator().manual_seed(0)
    sd = official_state_dict(g)
    torch.save(sd if wrap == "raw" else {"epoch": 1, "trainer": {"var_wo_ddp": sd}}, tmp_path / "FlexVARd2.pth")
    import_official_transformer(tmp_path / "FlexVARd2.pth", tmp_path / "out", tokenizer_dir=tmp_path / "no_tok")
    model, meta = load_flexvar(tmp_path / "out")
    assert (model.depth, model.width, model.heads, model.vocab_size, model.codebook_dim) == (DEPTH, C, HEADS, V, CV)
    assert (meta["num_classes"], meta["pe_size"]) == (NCLS, P)
    sides = [1, 2, 3, 5, 8]
    label = torch.tensor([0, 5, NCLS])                 # NCLS = the null class
    x = torch.randn(3, sum(s * s for s in sides[1:]), CV, generator=g)
    with torch.no_grad():
        ours = model(label, x, [(s, s) for s in sides])
    torch.testing.assert_close(ours, reference_logits(sd, label, x, sides), rtol=1e-4, atol=1e-4)


def test_not_a_transformer_is_a_clear_error(tmp_path):
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="missing"):
        import_official_transformer(tmp_path / "x.pth", tmp_path / "out", tmp_path)
