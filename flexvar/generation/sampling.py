"""Token sampling for one generation step: classifier-free guidance, top-k / top-p, seeded draws.

Guidance follows the FlexVAR/VAR convention: logits = (1 + t) * cond - t * uncond, so t = 0 is
plain conditional sampling. With the paper's ramp, step k of n uses t = guidance * k / min(n - 1, 9):
no guidance on the first (global) step, full strength by step 10 and more after it. Scales
outside the trained range get the full `guidance` (the ramp was tuned for trained scales).
The settings come as one `SamplingSettings` (flexvar/config.py) through flexvar/generation/generate.py.

Greedy rules (`greedy_step`): the official sampler (FlexVAR models/flexvar.py,
autoregressive_infer_cfg) draws with top-k/top-p only at scales in OFFICIAL_SAMPLED_SCALES up to
the trained size and takes the argmax everywhere else; 'outside' is greedy only above the
trained size, 'none' never forces greedy.

    >>> guidance_scale(1.5, step=0, num_steps=7, schedule="ramp"), guidance_scale(1.5, 6, 7, "ramp")
    (0.0, 1.5)
"""
from __future__ import annotations

import torch


OFFICIAL_SAMPLED_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32)   # official models/flexvar.py:230
GREEDY_RULES = ("official", "outside", "none")


def greedy_step(hw: tuple[int, int], train_side: int | None, rule: str = "official") -> bool:
    """Whether the step at scale hw takes greedy tokens (top-k 1) under `rule` (long side for non-square)."""
    if rule not in GREEDY_RULES:
        raise ValueError(f"greedy rule must be one of {', '.join(GREEDY_RULES)}, got {rule!r}")
    side = max(hw)
    outside = train_side is not None and side > train_side
    if rule == "official":
        return outside or side not in OFFICIAL_SAMPLED_SCALES
    return outside and rule == "outside"


def guidance_scale(guidance: float, step: int, num_steps: int, schedule: str = "ramp") -> float:
    """t of step `step` (0-based) in a `num_steps` schedule: 'ramp' (paper) or 'constant'."""
    if schedule == "constant":
        return float(guidance)
    if schedule != "ramp":
        raise ValueError(f"guidance schedule must be 'ramp' or 'constant', got {schedule!r}")
    return float(guidance) * step / max(min(num_steps - 1, 9), 1)


def guide(logits_2BlV: torch.Tensor, t: float) -> torch.Tensor:
    """(2B, l, V) logits, conditional half first, unconditional second -> guided (B, l, V)."""
    cond_BlV, uncond_BlV = logits_2BlV.chunk(2, dim=0)
    if t == 0.0:
        return cond_BlV
    return (1.0 + t) * cond_BlV - t * uncond_BlV


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf (0 = off).

    The most likely token always survives, so a distribution is never emptied.
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth_Bl1 = logits_BlV.topk(top_k, dim=-1).values[..., -1:]
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=True)
        probs_BlV = sorted_BlV.softmax(dim=-1)
        mass_before_BlV = probs_BlV.cumsum(dim=-1) - probs_BlV   # probability of strictly better tokens
        drop_sorted = mass_before_BlV > top_p
        drop_BlV = torch.zeros_like(drop_sorted).scatter(-1, order_BlV, drop_sorted)
        logits_BlV = logits_BlV.masked_fill(drop_BlV, float("-inf"))
    return logits_BlV


def sample_tokens(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per position, (B, l); top_k == 1 is greedy (argmax, no random draw).

    With top-k the draw runs over the k best candidates only (same distribution as masking the
    rest to -inf, but k instead of V random numbers per position: the main cost at V = 4096).
    """
    if top_k == 1:
        return logits_BlV.argmax(dim=-1)
    B, l, V = logits_BlV.shape
    logits_BlV = logits_BlV.float()
    if 0 < top_k < V:
        cand_BlK, ids_BlK = logits_BlV.topk(top_k, dim=-1)          # sorted, best first
        cand_BlK = filter_top_k_top_p(cand_BlK, 0, top_p)
        probs_NK = cand_BlK.softmax(dim=-1).reshape(B * l, top_k)
        pick_N1 = torch.multinomial(probs_NK, 1, generator=generator)
        return ids_BlK.reshape(B * l, top_k).gather(1, pick_N1).view(B, l)
    probs_NV = filter_top_k_top_p(logits_BlV, 0, top_p).softmax(dim=-1).reshape(B * l, V)
    return torch.multinomial(probs_NV, 1, generator=generator).view(B, l)


__all__ = ["OFFICIAL_SAMPLED_SCALES", "greedy_step", "guidance_scale", "guide", "filter_top_k_top_p", "sample_tokens"]
