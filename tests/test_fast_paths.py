"""Each speed path of flexvar/transformer/fast_paths.py computes what the plain path of model.py computes.

Tolerances are relative to the size of the output they compare (`close`): max |ours - plain| <= rel *
max |plain|, with rel the rounding of the precision the path runs in (fp64: 1e-10 or tighter; fp32:
1e-4 to 2e-6; bf16: 1e-2 to 2e-2), so a test means the same whatever the scale of the values.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexvar.config import TrainTransformerConfig, TransformerConfig
from flexvar.optim import make_adamw
from flexvar.tokenizer.quantizer import MultiScaleQuantizer
from flexvar.transformer import fast_paths
from flexvar.transformer.model import FlexVAR, attention, attention_mask, block_causal_bias, scale_levels
from flexvar.transformer.teacher_forcing import gt_inputs_targets

SCALES = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8)]        # 103 tokens


def close(ours: torch.Tensor, plain: torch.Tensor, rel: float) -> None:
    """max |ours - plain| <= rel * max |plain| (and the same shape and dtype)."""
    assert ours.shape == plain.shape and ours.dtype == plain.dtype, (ours.shape, plain.shape, ours.dtype, plain.dtype)
    ours, plain = ours.detach().double(), plain.detach().double()
    err, size = float((ours - plain).abs().max()), float(plain.abs().max())
    assert size > 0 and err <= rel * size, f"max |diff| {err:.3e} > {rel:g} x max |plain| {size:.3e}"


def qkv(L: int = 14, dtype=torch.float64, grad: bool = True):
    """q scaled like the model's (unit rows x 4), unit-row k, and v: logits of the size the model makes."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, L, 8, dtype=dtype).unbind(0)
    q, k = 4 * F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return [t.clone().requires_grad_(grad) for t in (q, k, v)]


def tiny(attention_kind: str, **kw) -> FlexVAR:
    torch.manual_seed(0)
    m = FlexVAR(TransformerConfig(depth=2, width=32, heads=2, drop_path_rate=0.0, class_dropout=0.0,
                                  attention=attention_kind, **kw), 64, 8, 4, pe_size=8)
    with torch.no_grad():   # non-trivial AdaLN gammas so the blocks matter numerically
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch(scales, n: int = 3):
    torch.manual_seed(1)
    x, _ = gt_inputs_targets(MultiScaleQuantizer(64, 8), torch.randn(n, 8, 8, 8), scales)
    return torch.arange(n) % 4, x


# ---------------------------------------------------------------------------------------------- attention
def test_auto_picks_plain_on_cpu_flex_on_cuda_sdpa_with_attention_dropout():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast_paths.pick_attention("auto", cpu, attn_dropout=False) == "plain"
    assert fast_paths.pick_attention("auto", cpu, attn_dropout=True) == "plain"
    assert fast_paths.pick_attention("auto", cuda, attn_dropout=False) == "flex"
    assert fast_paths.pick_attention("auto", cuda, attn_dropout=True) == "sdpa"
    for kind in ("plain", "sdpa", "flex"):
        assert fast_paths.pick_attention(kind, cuda, attn_dropout=False) == kind
    assert tiny("auto").attention_path(cpu) == ("plain", attention)
    assert tiny("sdpa").attention_path(cpu) == ("sdpa", fast_paths.sdpa_attention)


@pytest.mark.parametrize("masked", [True, False])
def test_sdpa_attention_is_the_plain_attention(masked):
    """scaled_dot_product_attention with the additive mask: the plain function's values and gradients (fp64)."""
    bias = block_causal_bias(scale_levels(((1, 1), (2, 2), (3, 3)))) if masked else None
    q, k, v = qkv()
    plain = attention(q, k, v, bias, 0.0)
    ours = fast_paths.sdpa_attention(q, k, v, bias, 0.0)
    close(ours, plain, 1e-10)
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(plain, (q, k, v), g)):
        close(a, b, 1e-10)


def test_flex_attention_is_the_plain_attention():
    """FlexAttention with the BlockMask of the same levels: the plain function's values (CPU: forward only),
    unpadded and with padding tokens after the last scale."""
    for pad_to in (0, 128):
        level = scale_levels(tuple(SCALES), pad_to)
        q, k, v = qkv(len(level), torch.float32, grad=False)
        plain = attention(q, k, v, block_causal_bias(level), 0.0)
        ours = fast_paths.flex_attention(q, k, v, fast_paths.flex_block_mask(level), 0.0)
        close(ours, plain, 1e-5)
    with pytest.raises(ValueError, match="attn_drop_rate"):
        fast_paths.flex_attention(q, k, v, fast_paths.flex_block_mask(level), 0.1)


def test_attention_masks_are_built_once_per_schedule():
    key = ("flex", tuple(SCALES), "cpu", 128)
    assert attention_mask(*key) is attention_mask(*key)
    assert attention_mask("plain", *key[1:]) is attention_mask("plain", *key[1:])


@pytest.mark.parametrize("kind", ["sdpa", "flex"])
def test_model_on_a_speed_path_computes_the_plain_model(kind):
    """The whole model with `transformer.attention` set to a speed path: the plain model's logits
    (teacher forcing; flex pads to its bucket), its KV-cached generation steps, and for sdpa its gradients."""
    plain, fast = tiny("plain").eval(), tiny(kind).eval()
    labels, x = batch(SCALES)
    with torch.no_grad():
        ref = plain(labels, x, SCALES)
        close(fast(labels, x, SCALES), ref, 1e-5)
        for m in (plain, fast):
            m.enable_kv_cache(True)
        cond, start = plain.class_cond(labels), 0
        for k, (h, w) in enumerate(SCALES):
            x_in = plain.step_input(cond, (h, w), None if k == 0 else x[:, start:start + h * w])
            start += h * w if k else 0
            close(fast.step_logits(x_in, cond), plain.step_logits(x_in, cond), 1e-5)
        for m in (plain, fast):
            m.enable_kv_cache(False)
    if kind == "sdpa":
        plain.train(), fast.train()
        for m in (plain, fast):
            m(labels, x, SCALES).logsumexp(-1).mean().backward()
        for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
            assert a.grad is not None, name
            close(a.grad, b.grad, 1e-4)


# ---------------------------------------------------------------------------------------------- Linear
def test_fused_linear_in_bf16_inference_is_linear_then_gelu():
    """Sampling on a bf16 CPU runs each Linear as one oneDNN matmul on cached bf16 weights (GELU fused
    into the MLP's first): nn.Linear then tanh-GELU, to bf16 rounding; fp32 or with gradients on it is
    nn.Linear exactly, differentiable."""
    torch.manual_seed(0)
    fc = fast_paths.Linear(32, 128)
    with torch.no_grad():
        fc.bias.normal_()
    x = 3 * torch.randn(4, 7, 32)
    plain = F.gelu(F.linear(x, fc.weight, fc.bias), approximate="tanh")
    per_call_bias = torch.randn(128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_paths.cpu_bf16_inference(x)
        out = fc(x, act="gelu")
        no_act = fc(x, bias=per_call_bias)
    assert out.dtype == no_act.dtype == torch.bfloat16
    close(out.float(), plain, 2e-2)
    close(no_act.float(), F.linear(x, fc.weight, per_call_bias), 2e-2)
    with torch.no_grad():
        fc.weight.mul_(2)                                    # the cached bf16 copy follows in-place updates
        with torch.autocast("cpu", dtype=torch.bfloat16):
            doubled = fc(x).float()
        close(doubled, F.linear(x, fc.weight, fc.bias), 2e-2)
        assert not fast_paths.cpu_bf16_inference(x)          # fp32 inference: exactly nn.Linear
        torch.testing.assert_close(fc(x), F.linear(x, fc.weight, fc.bias), rtol=0, atol=0)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_paths.cpu_bf16_inference(x)
        fc(x, act="gelu").float().sum().backward()
    assert x.grad is not None and fc.weight.grad is not None


def test_bf16_linear_follows_a_fused_adamw_step_between_evaluations():
    """Training evaluates every eval_every steps in bf16 (eval mode, no grad) and steps the weights with the
    trainer's fused AdamW in between, which updates them without bumping their version counter: the next
    evaluation must use the new weights, not the bf16 copy the last one cached."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(fast_paths.Linear(16, 16))
    fc = model[0]
    opt = make_adamw(model, TrainTransformerConfig(lr=0.5, weight_decay=0.0))
    assert opt.defaults["fused"]
    x = torch.randn(8, 16)

    def evaluate_bf16() -> torch.Tensor:   # as training.evaluate: eval mode, no grad, bf16 autocast, then back
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float()
        model.train()
        return out

    before = evaluate_bf16()
    model(x).square().mean().backward()
    opt.step()
    after = evaluate_bf16()
    expected = F.linear(x, fc.weight, fc.bias).detach()
    close(after, expected, 2e-2)
    assert (after - before).abs().max() > 0.1                # the step moved the outputs, and the copy followed


def test_compiled_linear_is_linear_then_tanh_gelu():
    """What torch.compile traces for Linear (matmul, then bias, then GELU in its sigmoid form) is the same
    function as F.linear + F.gelu(approximate='tanh'), values and gradients (fp64, so only the formula
    is compared), with a bias, without one and without the activation."""
    torch.manual_seed(0)
    x = (3 * torch.randn(5, 7, 16, dtype=torch.float64)).requires_grad_()
    w = torch.randn(24, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    for bias, act in ((b, "gelu"), (None, "gelu"), (b, "none")):
        plain = F.linear(x, w, bias)
        plain = F.gelu(plain, approximate="tanh") if act == "gelu" else plain
        ours = fast_paths.compiled_linear(x, w, bias, act)
        close(ours, plain, 1e-12)
        g = torch.randn_like(plain)
        for a, r in zip(torch.autograd.grad(ours, (x, w), g), torch.autograd.grad(plain, (x, w), g)):
            close(a, r, 1e-10)


# ---------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_smoothed_cross_entropy_is_torch_cross_entropy(dtype, smoothing):
    """The loss with its gradient formed in the forward: F.cross_entropy(label_smoothing)'s value (fp32)
    and gradient (in the logits' dtype), for fp32 and bf16 logits; training's token_loss is it."""
    from flexvar.transformer.training import token_loss

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 30, 512, generator=g)).to(dtype).requires_grad_(True)
    tgt = torch.randint(0, 512, (2, 30), generator=g)
    ours = token_loss(logits, tgt, smoothing)
    (0.5 * ours).backward()
    grad_ours, logits.grad = logits.grad, None
    plain = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), label_smoothing=smoothing)
    (0.5 * plain).backward()
    assert ours.dtype == torch.float32 and grad_ours.dtype == dtype
    close(ours, plain, 1e-6)
    close(grad_ours.float(), logits.grad.float(), 2e-6 if dtype == torch.float32 else 1e-2)
