"""FlexVAR transformer: paper sizes, block-causal attention, non-square scales, KV cache, GT vs residual."""
import pytest
import torch

from flexvar.config import TransformerConfig
from flexvar.tokenizer.quantizer import MultiScaleQuantizer
from flexvar.transformer.teacher_forcing import (ResidualCanvas, gt_inputs_targets, gt_next_input, inputs_targets,
                                     residual_inputs_targets)
from flexvar.transformer.model import FlexVAR, attention, block_causal_bias, build_flexvar, scale_levels


@pytest.mark.parametrize("depth, paper", [(16, 310e6), (20, 600e6), (24, 1.03e9)])
def test_paper_param_counts_on_meta(depth, paper):
    """Tab. 1 at 256 px, vocab 4096, Cvae 32, 1000 classes. d24 is printed "1.0B" in the paper:
    VAR's d24 (same blocks) has 1.03B, so compare with that and also check the rounding."""
    m = build_flexvar(TransformerConfig(depth=depth), 4096, 32, 1000, pe_size=16, device="meta")
    n = m.num_params()
    assert abs(n - paper) / paper < 0.03, n
    assert round(n / 1e9, 1) == round(paper / 1e9, 1)
    assert m.width == 64 * depth and m.heads == depth


def test_block_causal_mask():
    m = block_causal_bias(scale_levels(((1, 1), (2, 1), (2, 2)), pad_to=9))
    assert m.shape == (9, 9) and m.dtype == torch.float32
    level = [0, 1, 1, 2, 2, 2, 2, 3, 3]                   # two padding tokens after the last scale
    for i in range(9):
        for j in range(9):
            assert m[i, j] == (0.0 if level[j] <= level[i] else float("-inf"))


def small_model(**kw) -> FlexVAR:
    torch.manual_seed(0)
    m = FlexVAR(TransformerConfig(depth=2, width=32, heads=2, **kw), vocab_size=24, codebook_dim=4,
                num_classes=5, pe_size=6)
    # make the AdaLN gammas and head non-trivial so every path matters numerically
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("masked", [True, False])
def test_attention_is_softmax_over_the_keys_of_coarser_scales(masked):
    """The plain attention against its definition, one query at a time: softmax of q.k over the keys a
    query may see (its own scale and coarser ones; every key without a mask) times their values,
    gradients included (fp64)."""
    torch.manual_seed(0)
    level = scale_levels(((1, 1), (2, 2), (3, 3)))
    q, k, v = (torch.randn(2, 3, 14, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours = attention(q, k, v, block_causal_bias(level) if masked else None, 0.0)
    rows = []
    for i in range(14):
        seen = level <= level[i] if masked else torch.ones(14, dtype=torch.bool)
        w = torch.softmax(torch.einsum("bhc,bhjc->bhj", q[:, :, i], k[:, :, seen]), dim=-1)
        rows.append(torch.einsum("bhj,bhjc->bhc", w, v[:, :, seen]))
    ref = torch.stack(rows, dim=2)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_future_scales_do_not_change_past_logits():
    m = small_model()
    scales = [(1, 1), (2, 3), (3, 5)]
    x = torch.randn(2, 6 + 15, 4)
    lab = torch.tensor([1, 4])
    a = m(lab, x, scales)
    x2 = x.clone()
    x2[:, 6:] += 1.0                      # change only the last step's inputs
    b = m(lab, x2, scales)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("pos_embed", ["scalable", "fixed"])
def test_kv_cache_step_logits_equal_full_forward(pos_embed):
    m = small_model(pos_embed=pos_embed)
    scales = [(1, 1), (2, 1), (3, 4), (6, 6)]           # non-square intermediate scales
    q = MultiScaleQuantizer(24, 4)
    z = torch.randn(3, 4, 6, 6)
    x_BLCv, _ = gt_inputs_targets(q, z, scales)
    lab = torch.tensor([0, 3, 5])                       # 5 = the null class
    full = m(lab, x_BLCv, scales)
    m.enable_kv_cache(True)
    cond = m.class_cond(lab)
    steps, start = [], 0
    for k, hw in enumerate(scales):
        if k == 0:
            x_in = m.step_input(cond, hw)
        else:
            n = hw[0] * hw[1]
            x_in = m.step_input(cond, hw, x_BLCv[:, start:start + n])
            start += n
        steps.append(m.step_logits(x_in, cond))
    m.enable_kv_cache(False)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_generation_rule_matches_teacher_forcing_gt():
    q = MultiScaleQuantizer(24, 4)
    z = torch.randn(2, 4, 8, 8)
    scales = [(1, 1), (2, 3), (5, 4), (8, 8)]
    x_BLCv, idx_BL = gt_inputs_targets(q, z, scales)
    assert idx_BL.shape == (2, 1 + 6 + 20 + 64) and x_BLCv.shape == (2, 6 + 20 + 64, 4)
    # step 2's input is step 1's codes (ids from the targets) upsampled
    zq = q.lookup(idx_BL[:, 1:7].view(2, 2, 3))
    torch.testing.assert_close(gt_next_input(zq, (5, 4)), x_BLCv[:, 6:26])
    # targets are the latent's own tokens at each scale (not residuals)
    torch.testing.assert_close(idx_BL[:, -64:].view(2, 8, 8), q.quantize(z, (8, 8))[0])


def test_residual_targets_and_summed_reconstruction():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(64, 4)
    z = torch.randn(2, 4, 8, 8)
    scales = [(1, 1), (2, 2), (4, 4), (8, 8)]
    x_gt, idx_gt = inputs_targets("gt", q, z, scales)
    x_res, idx_res, f_hat = residual_inputs_targets(q, z, scales)
    assert x_res.shape == x_gt.shape and idx_res.shape == idx_gt.shape
    z_unit = torch.nn.functional.normalize(z, dim=1)       # residuals start from the unit-norm latent
    assert torch.equal(idx_res[:, :1], q.nearest(z_unit.mean((2, 3), keepdim=True)).flatten(1))
    assert not torch.equal(idx_res, idx_gt)                # later steps predict residuals
    # replaying the targets reproduces f_hat and the inputs (the generation rule)
    canvas = ResidualCanvas(2, 4, (8, 8), "cpu")
    start, inputs = 0, []
    for k, (h, w) in enumerate(scales):
        canvas.add(q.lookup(idx_res[:, start:start + h * w].view(2, h, w)))
        start += h * w
        if k + 1 < len(scales):
            inputs.append(canvas.next_input(scales[k + 1]))
    torch.testing.assert_close(torch.cat(inputs, 1), x_res)
    torch.testing.assert_close(canvas.f_hat, f_hat)


def test_training_mode_runs_backward_with_dropouts():
    m = FlexVAR(TransformerConfig(depth=2, width=32, heads=2, drop_rate=0.1, attn_drop_rate=0.1,
                                  drop_path_rate=0.1), 24, 4, 5, 6).train()
    logits = m(torch.tensor([0, 1]), torch.randn(2, 4 + 36, 4), [(1, 1), (2, 2), (6, 6)])
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_not_learnable_pos_embed_is_a_buffer():
    m = FlexVAR(TransformerConfig(depth=1, width=16, heads=1, pos_embed_learnable=False), 8, 4, 2, 4)
    assert "pos_1CPP" not in dict(m.named_parameters()) and "pos_1CPP" in m.state_dict()
    assert m.pos_embed((9, 7)).shape == (1, 63, 16)      # scalable: larger than P (area, as the official code)


def test_unit_rows_is_normalise_then_scale():
    import torch.nn.functional as F

    from flexvar.transformer.model import unit_rows

    x = torch.randn(2, 3, 5, 8)
    x[0, 0, 0] = 0.0                                   # a zero row stays zero (eps clamp)
    scale = torch.rand(1, 3, 1, 1) + 0.5
    torch.testing.assert_close(unit_rows(x, scale), F.normalize(x, dim=-1) * scale)
    torch.testing.assert_close(unit_rows(x), F.normalize(x, dim=-1))


def test_adaln_modulation_is_cached_only_while_generating():
    m = small_model()
    cond = m.class_cond(torch.tensor([0, 1]))
    blk = m.blocks[0]
    assert blk.modulation(cond) is not blk.modulation(cond)      # training / teacher forcing: fresh each call
    m.enable_kv_cache(True)
    first = blk.modulation(cond)
    assert blk.modulation(cond) is first
    torch.testing.assert_close(first, blk.ada_lin(torch.nn.functional.silu(cond)))
    m.enable_kv_cache(False)
    assert blk.mod_cache is None
