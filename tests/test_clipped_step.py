"""distributed.clipped_step against PyTorch's own clip_grad_norm_ followed by opt.step()."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flexvar import distributed
from flexvar.optim import make_adamw

CFG = SimpleNamespace(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)


def trajectories(max_norm: float, fused: bool, steps: int = 4):
    """(reference, ours) models after `steps` AdamW steps on the same batches, and their gradient norms."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    ours = copy.deepcopy(ref)
    opt_ref, opt_ours = make_adamw(ref, CFG), make_adamw(ours, CFG)
    if not fused:
        for opt in (opt_ref, opt_ours):
            for group in opt.param_groups:
                group["fused"] = False
    norms = []
    for _ in range(steps):
        x = torch.randn(8, 16)
        ref(x).pow(2).sum().backward()
        n_ref = nn.utils.clip_grad_norm_(ref.parameters(), max_norm) if max_norm > 0 else None
        opt_ref.step()
        ours(x).pow(2).sum().backward()
        n_ours = distributed.clipped_step(opt_ours, ours.parameters(), max_norm)
        norms.append((n_ref, n_ours))
        opt_ref.zero_grad(set_to_none=True)
        opt_ours.zero_grad(set_to_none=True)
    assert not hasattr(opt_ours, "grad_scale")       # handed to the fused kernel for one step only
    return ref, ours, norms


def test_fused_clip_is_clip_grad_norm_then_step_up_to_fp32_rounding():
    ref, ours, norms = trajectories(max_norm=0.5, fused=True)
    assert all(n_ref > 0.5 for n_ref, _ in norms)   # every step clipped
    torch.testing.assert_close(norms[0][1], norms[0][0], rtol=0, atol=0)
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours, p_ref, rtol=1e-6, atol=1e-7)


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [1e6, 0.0])   # above the norm: factor 1; 0: no clipping at all
def test_unclipped_steps_are_identical(fused, max_norm):
    ref, ours, norms = trajectories(max_norm, fused)
    assert same(ref, ours)
    if max_norm > 0:
        assert all(torch.equal(n_ours, n_ref) for n_ref, n_ours in norms)


def test_unfused_clip_is_clip_grad_norm_then_step():
    ref, ours, _ = trajectories(0.5, fused=False)
    assert same(ref, ours)
