"""The tokenizer's encoder and decoder as inference runs them in bf16 (latent caching, tokenizer
evaluation, sampling): cached bf16 channels-last copies, sub-pixel upsampling in the decoder, and
calls in chunks of a few images on CPU.

Decoding the final token map is most of the time of sampling on a CPU (the VQ-16 decoder spends
~1 TFLOP on 16 images at 128 px), and encoding every training image and its flip is the latent
cache's whole cost, so the bf16 paths are built for them:

- **Cached bf16, channels-last copies** of encoder + quant_conv and of post_quant_conv + decoder: no
  per-call weight casts (as autocast makes), oneDNN's preferred layout. Rebuilt when the
  tokenizer's weights change.
- **Sub-pixel upsampling** (`SubpixelUpsample`): nearest 2x upsampling followed by a 3x3 conv is
  the same linear map as four 2x2 convs on the small map, one per output phase (row parity a,
  column parity b), whose kernels are sums of the 3x3 kernel's taps. 4 x 4 taps at (h, w) instead
  of 9 taps at (2h, 2w): 2.25x fewer multiply-adds in every upsampling conv (a fifth of the
  VQ-16 decoder's), and no upsampled copy of the input.
- **Chunks of at most `CPU_CHUNK_PIXELS` image pixels** on CPU: the activations are
  bounded by a few images (128 channels at 128 px: 4 MiB per image in bf16), whatever the batch;
  same speed within noise as one call (benchmarks/bench_sample.py setting). The decoder's trunk
  (everything below the last upsample, `Decoder.trunk`) works at half the output resolution and
  runs in chunks of 4x as many images: its small maps make better matmul shapes in larger batches
  (2-3% of the VQ-16 decode at 128 px, 16 images per trunk call instead of 4).

Values: the same linear maps with bf16 weights; the folded 2x2 kernels are summed in the tokenizer's
precision before the cast, so they differ from the 3x3 path by bf16 rounding only. `encode_images` /
`decode_latents` pick the path from the precision; their fp32 path is the tokenizer's own
`VQVAE.encode` / `VQVAE.decode` (what the conformance tests compare with the official code), untouched.
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from flexvar.device import resolve_precision
from flexvar.tokenizer.vqvae import Upsample

CPU_CHUNK_PIXELS = 4 * 128 * 128    # image pixels per encoder / decoder call on CPU (4 images at 128 px)

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


def bf16_copy(vqvae, part: str) -> nn.Module:
    """`part` 'encoder' (encoder + quant_conv) or 'decoder' (post_quant_conv + decoder, sub-pixel
    upsampling) as a bf16 channels-last copy, cached per tokenizer and rebuilt when its weights change
    (checked on the part's first and last conv) or the tokenizer changed mode (VQVAE.train: fused AdamW
    steps change weights without bumping their version)."""
    first, last = ((vqvae.encoder.conv_in, vqvae.quant_conv) if part == "encoder"
                   else (vqvae.post_quant_conv, vqvae.decoder.conv_out))
    stamp = (*((m.weight.data_ptr(), m.weight._version) for m in (first, last)), getattr(vqvae, "mode_changes", 0))
    cached = _CACHE.setdefault(vqvae, {})
    if part not in cached or cached[part][0] != stamp:
        if part == "encoder":
            net = nn.Sequential(copy.deepcopy(vqvae.encoder), copy.deepcopy(vqvae.quant_conv))
        else:
            decoder = copy.deepcopy(vqvae.decoder)
            for stage in decoder.conv_blocks:
                if isinstance(getattr(stage, "upsample", None), Upsample):
                    stage.upsample = SubpixelUpsample(stage.upsample)
            net = nn.Sequential(copy.deepcopy(vqvae.post_quant_conv), decoder)
        net = net.to(torch.bfloat16).to(memory_format=torch.channels_last).eval().requires_grad_(False)
        cached[part] = (stamp, net)
    return cached[part][1]


def run_chunked(net, x_BCHW: torch.Tensor, image_pixels: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """net(x) in bf16 channels-last, `out_dtype` out; on CPU in chunks of at most CPU_CHUNK_PIXELS image pixels."""
    x_BCHW = x_BCHW.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    chunk = max(1, CPU_CHUNK_PIXELS // image_pixels) if x_BCHW.device.type == "cpu" else len(x_BCHW)
    outs = [net(x).to(out_dtype) for x in x_BCHW.split(chunk)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.no_grad()
def decode_bf16(vqvae, z_BChw: torch.Tensor) -> torch.Tensor:
    """Quantised latents (B, C, h, w) -> images (B, 3, f h, f w), roughly in [-1, 1], fp32 on the latents' device.
    The trunk and the full-resolution finish are chunked by their own output pixels."""
    post_quant_conv, decoder = bf16_copy(vqvae, "decoder")
    hw, f = z_BChw.shape[-2] * z_BChw.shape[-1], vqvae.downsample
    trunk_pixels = hw * (f // decoder.trunk_upsampling) ** 2
    feats_BCHW = run_chunked(lambda z: decoder.trunk(post_quant_conv(z)), z_BChw, trunk_pixels, torch.bfloat16)
    return run_chunked(decoder.finish, feats_BCHW, hw * f ** 2)


@torch.no_grad()
def encode_bf16(vqvae, img_BCHW: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> continuous latents (B, Cvae, H/f, W/f), fp32 on the images' device."""
    return run_chunked(bf16_copy(vqvae, "encoder"), img_BCHW, img_BCHW.shape[-2] * img_BCHW.shape[-1])


@torch.no_grad()
def encode_images(vqvae, img_BCHW: torch.Tensor, precision: str) -> torch.Tensor:
    """Inference encode in `precision` ('auto' resolved on the images' device), fp32 latents: the cached
    bf16 copy in bf16, the tokenizer's own encoder otherwise."""
    if resolve_precision(img_BCHW.device, precision) == "bf16":
        return encode_bf16(vqvae, img_BCHW)
    return vqvae.encode(img_BCHW.float()).float()


@torch.no_grad()
def decode_latents(vqvae, z_BChw: torch.Tensor, precision: str) -> torch.Tensor:
    """Inference decode in `precision` ('auto' resolved on the latents' device), fp32 images (not clamped):
    the cached bf16 copy in bf16, the tokenizer's own decoder otherwise."""
    if resolve_precision(z_BChw.device, precision) == "bf16":
        return decode_bf16(vqvae, z_BChw)
    return vqvae.decode(z_BChw.float()).float()
