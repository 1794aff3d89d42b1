"""How much memory a generation needs, estimated before anything is allocated, and the refusal above a limit.

Nothing in a schedule caps its scales: `--schedule 1,2,99` on a 16 px model asks for a 99x99
token map, and the attention over it (transformer and tokenizer decoder alike) grows with the
square of its token count — tens of GB. `check_generation_memory` estimates the peak from the
model sizes, the schedule and the batch, and raises a ScheduleError naming the setting before
the first tensor is made. The estimate counts float32 bytes of the largest live tensors of one
batch (KV cache, attention scores, MLP activations, logits and their sorted copy; the decoder's
widest feature maps and its attention), plus the finished images the caller holds at once (one
batch for a caller that streams batches to disk, like the `sample` stage; all of them for
`flexvar generate`'s single grid), plus what the caller keeps for the whole run (`held_bytes`:
the `sample` stage's labels and grid, bounded whatever the number of samples), times SLACK for
the allocator; it is meant to be above the measured peak (tests/test_generation_memory.py
measures it), not exact. Measured on CPU (peak RSS growth vs estimate): 8x8 batch 32 on the
embedded default's models 0.17 vs 0.28 GB; up to 24x24 batch 16: 0.96 vs 1.63 GB; tiny models up to
48x48 batch 16: 4.22 vs 5.33 GB.
"""
from __future__ import annotations

from flexvar.config import SampleConfig
from flexvar.generation.generate import Scales, ScheduleError

F32 = 4
GIB = 1024 ** 3
SLACK = 1.25   # allocator caches, temporaries not counted above
# sample.max_memory_gb's default (16: fits a 24 GiB machine with the OS, Python and the models beside it)
DEFAULT_MAX_MEMORY_GB = SampleConfig.model_fields["max_memory_gb"].default


def transformer_bytes(model, scales: Scales, batch: int, guided: bool) -> int:
    """Peak bytes of the scale-wise transformer for one batch (KV cache + the largest step's tensors)."""
    rows = (2 if guided else 1) * batch
    total = sum(h * w for h, w in scales)
    step = max(h * w for h, w in scales)
    kv_cache = model.depth * 2 * rows * total * model.width
    attention = 2 * rows * model.heads * step * total              # scores and probabilities
    mlp = 2 * rows * step * model.width * (int(model.cfg.mlp_ratio) + 4)
    logits = 4 * rows * step * model.vocab_size                     # logits, fp32 copy, guided, sorted
    return F32 * (kv_cache + attention + mlp + logits)


def decoder_bytes(vqvae, latent_hw: tuple[int, int], batch: int) -> int:
    """Peak bytes of decoding one batch of (h, w) token maps: the widest stage's maps and the latent attention."""
    cfg = vqvae.cfg
    h, w = latent_hw
    levels = len(cfg.ch_mult)
    widest = max(cfg.ch * mult * h * w * 4 ** (levels - 1 - i) for i, mult in enumerate(cfg.ch_mult))
    attention = 2 * (h * w) ** 2
    return F32 * batch * (4 * widest + attention)


def generation_bytes(model, vqvae, scales: Scales, batch: int, guided: bool, num_images: int | None = None) -> int:
    """Estimated peak bytes of generating with `scales` in batches of `batch` while holding `num_images`
    finished images at once (default: one batch, for a caller that writes each batch and drops it)."""
    h, w = scales[-1]
    f = vqvae.cfg.downsample
    images = F32 * 2 * (num_images or batch) * 3 * (h * f) * (w * f)   # float images + their uint8/grid copies
    peak = max(transformer_bytes(model, scales, batch, guided), decoder_bytes(vqvae, (h, w), batch)) + images
    return int(SLACK * peak)


def check_generation_memory(model, vqvae, scales: Scales, batch: int, guided: bool, limit_gb: float,
                            what: str, setting: str, num_images: int | None = None, held_bytes: int = 0) -> int:
    """Raise ScheduleError naming `what` and `setting` if the estimate (`generation_bytes` plus `held_bytes`
    the caller keeps for the whole run) exceeds `limit_gb`; return the bytes."""
    held = int(SLACK * held_bytes)
    need = generation_bytes(model, vqvae, scales, batch, guided, num_images) + held
    if need > limit_gb * GIB:
        h, w = scales[-1]
        kept = f", {held / GIB:.2f} GB of it kept for the whole run" if held else ""
        raise ScheduleError(
            f"{what}: generating needs about {need / GIB:.1f} GB (final scale {h}x{w} tokens, batch {batch}{kept}), "
            f"above the {limit_gb:g} GB limit; use smaller scales or batch, or raise {setting}")
    return need
