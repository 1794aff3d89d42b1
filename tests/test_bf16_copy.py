"""The tokenizer's bf16 inference copies: sub-pixel upsampling is the same linear map as
nearest-upsample + 3x3 conv; bf16 encode/decode match the fp32 encoder/decoder within bf16 rounding,
in chunks or not, and follow the tokenizer's weights when they change."""
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


def tiny_vq() -> VQVAE:
    torch.manual_seed(1)
    return VQVAE(TokenizerConfig(ch=16, ch_mult=[1, 2, 2], z_channels=16, codebook_dim=8, codebook_size=32)).eval()


def test_bf16_decode_matches_fp32_decoder():
    vq = tiny_vq()
    z = torch.randn(5, 8, 3, 5)
    with torch.no_grad():
        ref = vq.decode(z)
    out = bd.decode_bf16(vq, z)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (5, 3, 12, 20)
    err = (out - ref).abs()
    assert err.mean() < 0.02 and err.max() < 0.2, (err.mean(), err.max())   # bf16 rounding, not a different map
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
    assert (out - ref).abs().max() < 0.2


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
    torch.testing.assert_close(chunked, whole, rtol=0, atol=2e-2)


def test_cached_copy_follows_weight_updates():
    vq = tiny_vq()
    z = torch.randn(2, 8, 2, 2)
    before = bd.decode_bf16(vq, z)
    with torch.no_grad():
        vq.decoder.conv_out.weight.zero_()
        vq.decoder.conv_out.bias.fill_(0.25)
    after = bd.decode_bf16(vq, z)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, torch.full_like(after, 0.25))


def test_bf16_encode_matches_fp32_encoder(monkeypatch):
    vq = tiny_vq()
    x = torch.rand(5, 3, 12, 20) * 2 - 1
    with torch.no_grad():
        ref = vq.encode(x)
    out = bd.encode_bf16(vq, x)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (5, 8, 3, 5)
    err = (out - ref).abs()
    assert err.mean() < 0.02 * ref.abs().mean() + 1e-3 and err.max() < 0.1 * ref.abs().max(), (err.mean(), err.max())
    monkeypatch.setattr(bd, "CPU_CHUNK_PIXELS", 12 * 20)      # one image per call
    torch.testing.assert_close(bd.encode_bf16(vq, x), out, rtol=0, atol=1e-2 * ref.abs().max().item())


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
