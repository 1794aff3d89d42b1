"""The decoder as sampling and tokenizer evaluation run it in bf16: a cached bf16 channels-last copy,
sub-pixel upsampling, and decoding in chunks of a few images on CPU.

Decoding the final token map is most of the time of sampling on a CPU (the VQ-16 decoder spends
~1 TFLOP on 16 images at 128 px), so the bf16 path is built for it:

- **A cached bf16, channels-last copy** of post_quant_conv + decoder: no per-call weight casts (as
  autocast makes), oneDNN's preferred layout. Rebuilt when the tokenizer's weights change.
- **Sub-pixel upsampling** (`SubpixelUpsample`): nearest 2x upsampling followed by a 3x3 conv is
  the same linear map as four 2x2 convs on the small map, one per output phase (row parity a,
  column parity b), whose kernels are sums of the 3x3 kernel's taps. 4 x 4 taps at (h, w) instead
  of 9 taps at (2h, 2w): 2.25x fewer multiply-adds in every upsampling conv (a fifth of the
  VQ-16 decoder's), and no upsampled copy of the input.
- **Chunks of at most `CPU_CHUNK_PIXELS` output pixels** on CPU: the decoder's activations are
  bounded by a few images (128 channels at 128 px: 4 MiB per image in bf16), whatever the batch;
  same speed within noise as one call (benchmarks/bench_sample.py setting).

Values: the same linear maps with bf16 weights; the folded 2x2 kernels are summed in the tokenizer's precision before
the cast, so they differ from the 3x3 path by bf16 rounding only. The fp32 path (`VQVAE.decode`),
which the conformance tests compare with the official code, is untouched.
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from flexvar.tokenizer.vqvae import Upsample

CPU_CHUNK_PIXELS = 4 * 128 * 128    # output pixels per decoder call on CPU (4 images at 128 px)

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fold_taps(w_OIkk: torch.Tensor, phase: int, dim: int) -> torch.Tensor:
    """The 2 taps along `dim` that a 3-tap kernel applies to the un-upsampled input at output parity
    `phase`: even outputs see rows (i-1, i, i) -> (w0, w1 + w2), odd ones (i, i, i+1) -> (w0 + w1, w2)."""
    w0, w1, w2 = w_OIkk.unbind(dim)
    return torch.stack([w0, w1 + w2] if phase == 0 else [w0 + w1, w2], dim)


class SubpixelUpsample(nn.Module):
    """`Upsample` (nearest 2x, then a 3x3 conv with zero padding 1) as one 2x2 conv to 4x the channels
    on the 1-padded small map, whose four channel groups are interleaved into the 2x map.

    Phase (a, b) of the output, out[2i + a, 2j + b], is its 2x2 kernel applied at rows (i - 1 + a, i + a)
    and columns (j - 1 + b, j + b) of the input, i.e. at offset (a, b) of the 2x2 conv over the padded map.
    """

    def __init__(self, up: Upsample):
        super().__init__()
        w_OI33 = up.conv.weight.detach()
        phases = [fold_taps(fold_taps(w_OI33, a, 2), b, 3) for a in (0, 1) for b in (0, 1)]
        self.weight = nn.Parameter(torch.cat(phases, 0), requires_grad=False)           # (4 O, I, 2, 2)
        self.bias = nn.Parameter(up.conv.bias.detach().repeat(4), requires_grad=False)
        self.out_channels = w_OI33.shape[0]

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x_BCHW.shape
        O = self.out_channels
        y_B4Ohw = F.conv2d(F.pad(x_BCHW, (1, 1, 1, 1)), self.weight, self.bias)       # (B, 4 O, H + 1, W + 1)
        out = torch.empty(B, O, 2 * H, 2 * W, dtype=y_B4Ohw.dtype, device=y_B4Ohw.device,
                          memory_format=torch.channels_last)
        phases = rearrange(out, "b o (h a) (w c) -> a c b o h w", a=2, c=2)             # views into `out`
        for a in (0, 1):
            for b in (0, 1):
                p = 2 * a + b
                phases[a, b].copy_(y_B4Ohw[:, p * O:(p + 1) * O, a:a + H, b:b + W])
        return out


def bf16_decoder(vqvae) -> nn.Module:
    """post_quant_conv + decoder as a bf16 channels-last copy with sub-pixel upsampling, cached per
    tokenizer and rebuilt when its weights change (checked on the first and last conv)."""
    stamp = tuple((p.data_ptr(), p._version) for p in (vqvae.post_quant_conv.weight, vqvae.decoder.conv_out.weight))
    hit = _CACHE.get(vqvae)
    if hit is None or hit[0] != stamp:
        decoder = copy.deepcopy(vqvae.decoder)
        for stage in decoder.conv_blocks:
            if isinstance(getattr(stage, "upsample", None), Upsample):
                stage.upsample = SubpixelUpsample(stage.upsample)
        dec = nn.Sequential(copy.deepcopy(vqvae.post_quant_conv), decoder)
        dec = dec.to(torch.bfloat16).to(memory_format=torch.channels_last).eval().requires_grad_(False)
        _CACHE[vqvae] = hit = (stamp, dec)
    return hit[1]


@torch.no_grad()
def decode_bf16(vqvae, z_BChw: torch.Tensor) -> torch.Tensor:
    """Quantised latents (B, C, h, w) -> images (B, 3, f h, f w) in [-1, 1], fp32 on the latents' device;
    on CPU in chunks of at most CPU_CHUNK_PIXELS output pixels (at least one image)."""
    dec = bf16_decoder(vqvae)
    z_BChw = z_BChw.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    B, _, h, w = z_BChw.shape
    per_image = h * w * vqvae.downsample ** 2
    chunk = max(1, CPU_CHUNK_PIXELS // per_image) if z_BChw.device.type == "cpu" else B
    return torch.cat([dec(z).float().clamp_(-1, 1) for z in z_BChw.split(chunk)])
