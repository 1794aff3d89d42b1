"""Conformance with the official FlexVAR code: references produced by RUNNING the official code.

tests/conformance/make_references.py built small random-initialised official-layout models
(official models/vq_llama.py and models/flexvar.py), ran them and committed their state dicts and
outputs under tests/conformance/data/. Here the state dicts go through `flexvar import-official`
into this project's models, and every output is compared with the official one. Nothing here
imports official code or recomputes a reference with this project's helpers.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexvar.checkpoint import CheckpointError
from flexvar.data.splits import to_uint8
from flexvar.config import SamplingSettings
from flexvar.generation.generate import generate
from flexvar.generation.sampling import greedy_step
from flexvar.official import TRANSFORMER_RENAMES, import_official_tokenizer
from flexvar.tokenizer.vqvae import load_tokenizer
from flexvar.transformer.checkpoint import load_flexvar
from flexvar.transformer.teacher_forcing import gt_inputs_targets

DATA = Path(__file__).resolve().parent / "conformance" / "data"
REFS = torch.load(DATA / "references.pt", weights_only=True)
CFG = REFS["config"]
TF = ["canonical", "drawn"]
GEN = [k[len("gen_"):-len("_scales")] for k in REFS if k.startswith("gen_") and k.endswith("_scales")]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from flexvar.cli import main

    out = tmp_path_factory.mktemp("official")
    assert main(["import-official", "--tokenizer", str(DATA / "official_tokenizer.pth"),
                 "--transformer", str(DATA / "official_transformer.pth"), "--out", str(out)]) == 0
    vq = load_tokenizer(out)
    model, meta = load_flexvar(out)
    return vq, model.eval(), meta


def test_imported_tokenizer_records_llamagen_groups(imported):
    vq, _, _ = imported
    assert (vq.cfg.norm_groups, vq.cfg.norm_min_group_channels) == (32, 1)
    norms = [m for m in vq.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {m.num_channels for m in norms} == {32, 64} and {m.num_groups for m in norms} == {32}


def test_tokenizer_encoder_latent_indices_decode(imported):
    vq, _, _ = imported
    x = REFS["image"]
    with torch.no_grad():
        torch.testing.assert_close(vq.encoder(x), REFS["encoder_out"], rtol=1e-4, atol=1e-4)
        z = vq.encode(x)
        torch.testing.assert_close(z, REFS["latent"], rtol=1e-4, atol=1e-4)
        for s in (1, 2, 3, 5, 8, 16):
            idx, _ = vq.quantize_at(z, (s, s))
            assert torch.equal(idx, REFS[f"indices_{s}"]), f"indices differ at scale {s}"
            torch.testing.assert_close(vq.decode_indices(idx), REFS[f"decode_{s}"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TF)
def test_teacher_forcing_inputs_and_targets(imported, name):
    vq, _, _ = imported
    scales = [(s, s) for s in _tf_scales(name)]
    with torch.no_grad():
        x_BLCv, target_BL = gt_inputs_targets(vq.quantize, vq.encode(REFS["image"]), scales)
    torch.testing.assert_close(x_BLCv, REFS[f"tf_{name}_input"], rtol=1e-4, atol=1e-5)
    assert torch.equal(target_BL, REFS[f"tf_{name}_target"])


@pytest.mark.parametrize("name", TF)
def test_transformer_logits_loss_and_gradients(imported, name):
    _, model, _ = imported
    scales = [(s, s) for s in _tf_scales(name)]
    model.zero_grad(set_to_none=True)
    logits = model(REFS["tf_label"], REFS[f"tf_{name}_input"], scales)
    torch.testing.assert_close(logits, REFS[f"tf_{name}_logits"], rtol=1e-4, atol=1e-4)
    loss = F.cross_entropy(logits.reshape(-1, CFG["codebook_size"]), REFS[f"tf_{name}_target"].view(-1))
    torch.testing.assert_close(loss, REFS[f"tf_{name}_loss"], rtol=1e-5, atol=1e-6)
    if f"tf_{name}_grads" not in REFS:
        return
    loss.backward()
    ours = dict(model.named_parameters())
    for key, g_ref in REFS[f"tf_{name}_grads"].items():
        g = ours[_our_name(key)].grad
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-6, msg=lambda m: f"{key}: {m}")
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", GEN)
def test_official_greedy_rule(name):
    scales = REFS[f"gen_{name}_scales"]
    ours = [greedy_step((s, s), CFG["train_side"], "official") for s in scales]
    assert ours == REFS[f"gen_{name}_greedy_steps"]


@pytest.mark.parametrize("name", GEN)
def test_greedy_generation_tokens_and_images(imported, name):
    vq, model, meta = imported
    scales = [(s, s) for s in REFS[f"gen_{name}_scales"]]
    out = greedy_generation(vq, model, meta, scales)
    for k, (ours, ref) in enumerate(zip(out.tokens, REFS[f"gen_{name}_tokens"])):
        assert torch.equal(ours, ref), f"step {k} tokens differ"
    diff = (to_uint8(out.images).int() - to_uint8(REFS[f"gen_{name}_images"].clamp(-1, 1)).int()).abs().max()
    assert diff <= 1, f"max pixel difference {diff}"


def test_official_position_map_initialisation():
    from flexvar.transformer.model import sincos_2d_interleaved

    torch.testing.assert_close(sincos_2d_interleaved(16, 8, 6)[None], REFS["pos_init_8x6_d16"], rtol=1e-6, atol=1e-6)


def test_unrepresentable_official_layout_is_refused(tmp_path):
    sd = torch.load(DATA / "official_tokenizer.pth", weights_only=True)["model"]
    sd = {k: (v[:48] if re.search(r"norm[^.]*\.(weight|bias)$", k) and v.shape[0] == 64 else v) for k, v in sd.items()}
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="cannot hold LlamaGen's 32 groups"):
        import_official_tokenizer(tmp_path / "odd.pth", tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.pt").exists()


# --------------------------------------------------------------------------- helpers
def greedy_generation(vq, model, meta, scales):
    """Our generation with the settings the references were made with: guidance ramp, top-k 1."""
    sampling = SamplingSettings(guidance=CFG["cfg"], guidance_schedule="ramp", top_k=1, top_p=0.0,
                                greedy_rule="official", precision="fp32")
    return generate(model, vq, torch.tensor(CFG["classes"]), scales, sampling, batch_size=len(CFG["classes"]), seed=0,
                    train_side=max(meta["latent_hw"]))


def _tf_scales(name: str) -> list[int]:
    return REFS[f"tf_{name}_scales"]


def _our_name(official_key: str) -> str:
    for pattern, repl in TRANSFORMER_RENAMES:
        official_key = re.sub(pattern, repl, official_key)
    return official_key
