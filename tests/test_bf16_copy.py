"""The tokenizer's bf16 inference copies: sub-pixel upsampling is the same linear map as
nearest-upsample + 3x3 conv; bf16 encode/decode match the fp32 encoder/decoder within bf16 rounding,
in chunks or not, and follow the tokenizer's weights when they change.

bf16 bounds are relative to the output's own magnitude (`assert_bf16_close`): bf16 keeps 8 significant
bits (2^-8 = 0.4% per rounding), a few roundings deep that is ~1-2% of the output, whatever its scale. The
encode/decode tests run at output scales 1e-3, 1 and 1e3 (the last layer's weights scaled), so an error
small in absolute terms but large against a small output fails, and a correct large output passes."""
import pytest
import torch
import torch.nn.functional as F

import flexvar.tokenizer.bf16_copy as bd
from flexvar.config import TokenizerConfig
from flexvar.tokenizer.vqvae import VQVAE, Upsample


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (4, 4), (6, 2)])
def test_subpixel_upsample_is_upsample_then_conv(hw):
    torch.manual_seed(0)
    up = Upsample(6).double()
    x = torch.randn(2, 6, *hw, dtype=torch.float64)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))   # the definition, not Upsample.forward
    out = bd.SubpixelUpsample(up)(x)
    assert out.shape == ref.shape == (2, 6, 2 * hw[0], 2 * hw[1])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


RMS_REL, PEAK_REL = 0.04, 0.05    # ~10 bf16 roundings of the output's RMS; 5% of its peak


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, rms_rel: float = RMS_REL, peak_rel: float = PEAK_REL):
    """out == ref up to bf16 rounding, measured against ref's own size: ||out - ref|| <= rms_rel ||ref|| and
    max |out - ref| <= peak_rel max |ref|."""
    err = (out.double() - ref.double())
    rms, peak = (err.norm() / ref.double().norm()).item(), (err.abs().max() / ref.double().abs().max()).item()
    assert rms <= rms_rel and peak <= peak_rel, f"relative error rms {rms:.4f} (<= {rms_rel}), peak {peak:.4f} (<= {peak_rel})"


def tiny_vq(scale: float = 1.0) -> VQVAE:
    """A tiny VQVAE; `scale` multiplies the last layer of encoder (quant_conv) and decoder (conv_out), so the
    latents and images are `scale` times the unscaled ones."""
    torch.manual_seed(1)
    vq = VQVAE(TokenizerConfig(ch=16, ch_mult=[1, 2, 2], z_channels=16, codebook_dim=8, codebook_size=32)).eval()
    with torch.no_grad():
        for layer in (vq.quant_conv, vq.decoder.conv_out):
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)
    return vq


SCALES = [1e-3, 1.0, 1e3]


def test_cached_copy_follows_a_fused_adamw_step_between_evaluations():
    """Tokenizer training evaluates in bf16 (eval mode) and steps with fused AdamW in between, which changes
    the weights without bumping their version: the next evaluation must decode with the new weights."""
    from flexvar.config import TrainTokenizerConfig
    from flexvar.optim import make_adamw

    vq = tiny_vq()
    opt = make_adamw(vq, TrainTokenizerConfig(lr=0.5, weight_decay=0.0))
    assert opt.defaults["fused"]
    z = torch.randn(2, 8, 2, 2)
    vq.eval()
    before = bd.decode_bf16(vq, z)
    vq.train()
    vq.decoder(vq.post_quant_conv(z)).square().mean().backward()
    opt.step()
    vq.eval()
    after = bd.decode_bf16(vq, z)
    with torch.no_grad():
        fresh = vq.decoder(vq.post_quant_conv(z))
    assert (after.float() - before.float()).abs().max() > 0.05            # the step moved the output
    err = (after.float() - fresh).abs().max() / fresh.abs().max()
    assert err < 0.05, float(err)                                          # and the bf16 copy followed it


@pytest.mark.parametrize("scale", SCALES)
def test_bf16_decode_matches_fp32_decoder(scale):
    vq = tiny_vq(scale)
    z = torch.randn(5, 8, 3, 5)
    with torch.no_grad():
        ref = vq.decode(z)
    out = bd.decode_bf16(vq, z)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (5, 3, 12, 20)
    assert ref.abs().max() > 0.5 * scale                          # the output does have this scale
    assert_bf16_close(out, ref)                                   # bf16 rounding, not a different map
    stages = bd.bf16_copy(vq, "decoder")[1].conv_blocks
    assert not any(isinstance(getattr(s, "upsample", None), Upsample) for s in stages)   # sub-pixel everywhere


def test_one_stage_decoder_has_no_upsample_to_split():
    torch.manual_seed(2)
    vq = VQVAE(TokenizerConfig(ch=16, ch_mult=[2], z_channels=16, codebook_dim=8, codebook_size=32)).eval()
    z = torch.randn(3, 8, 5, 4)
    assert vq.decoder.trunk_upsampling == 1
    with torch.no_grad():
        ref = vq.decode(z)
    out = bd.decode_bf16(vq, z)
    assert out.shape == ref.shape == (3, 3, 5, 4)
    assert_bf16_close(out, ref)


def test_trunk_stops_below_the_last_upsample():
    vq = tiny_vq()                                      # ch_mult [1, 2, 2]: f = 4
    z = torch.randn(2, 16, 3, 5)
    with torch.no_grad():
        feats = vq.decoder.trunk(z)
    assert feats.shape[-2:] == (6, 10) and vq.decoder.trunk_upsampling == 2     # half of the 12 x 20 image


def test_chunked_decode_equals_one_call(monkeypatch):
    vq = tiny_vq()
    z = torch.randn(7, 8, 4, 4)
    whole = bd.decode_bf16(vq, z)
    monkeypatch.setattr(bd, "CPU_CHUNK_PIXELS", 2 * 16 * 16)      # two 16x16 images per call
    chunked = bd.decode_bf16(vq, z)
    assert_bf16_close(chunked, whole)


def test_cached_copy_follows_weight_updates():
    vq = tiny_vq()
    z = torch.randn(2, 8, 2, 2)
    before = bd.decode_bf16(vq, z)
    with torch.no_grad():
        vq.decoder.conv_out.weight.zero_()
        vq.decoder.conv_out.bias.fill_(0.25)
    after = bd.decode_bf16(vq, z)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, torch.full_like(after, 0.25), rtol=2 ** -8, atol=0)   # 0.25 exact in bf16


@pytest.mark.parametrize("scale", SCALES)
def test_bf16_encode_matches_fp32_encoder(monkeypatch, scale):
    vq = tiny_vq(scale)
    x = torch.rand(5, 3, 12, 20) * 2 - 1
    with torch.no_grad():
        ref = vq.encode(x)
    out = bd.encode_bf16(vq, x)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (5, 8, 3, 5)
    assert ref.abs().max() > 0.5 * scale
    assert_bf16_close(out, ref)
    monkeypatch.setattr(bd, "CPU_CHUNK_PIXELS", 12 * 20)      # one image per call
    assert_bf16_close(bd.encode_bf16(vq, x), out)


def test_precision_picks_the_path():
    """fp32: exactly the tokenizer's own encoder/decoder; bf16: exactly the cached bf16 copies."""
    vq = tiny_vq()
    x = torch.rand(3, 3, 8, 12) * 2 - 1
    z = torch.randn(3, 8, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(bd.encode_images(vq, x, "fp32"), vq.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(bd.decode_latents(vq, z, "fp32"), vq.decode(z), rtol=0, atol=0)
    torch.testing.assert_close(bd.encode_images(vq, x, "bf16"), bd.encode_bf16(vq, x), rtol=0, atol=0)
    torch.testing.assert_close(bd.decode_latents(vq, z, "bf16"), bd.decode_bf16(vq, z), rtol=0, atol=0)
