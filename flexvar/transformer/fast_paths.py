"""The transformer's speed paths: other ways to compute what flexvar/transformer/model.py computes.

model.py reads as the method: one plain `attention` (softmax(q k^T + mask) v), nn.Linear, the
label-smoothed cross-entropy. What this file holds computes the same functions faster on some device;
the model picks them without the reader having to follow them, and tests/test_fast_paths.py checks
each one against the plain path.

Attention (`transformer.attention`; `pick_attention` resolves 'auto'):
- `plain`: model.attention, explicit matmuls with the additive block-causal mask: on a CPU, for
  FlexVAR's short sequences (<= a few thousand tokens), 2-3x faster forward + backward than the CPU
  flash kernel of scaled_dot_product_attention (benchmarks/bench_transformer.py). 'auto' on CPU.
- `sdpa`: `F.scaled_dot_product_attention` with the same mask (fused kernels on CUDA; the only path
  with attention dropout on CUDA).
- `flex`: FlexAttention with a block-sparse `BlockMask` of the same scale levels: skips the fully
  masked 128 x 128 blocks instead of multiplying through them. 'auto' on CUDA without attention
  dropout. The kernel is compiled with static shapes, so sequences are padded to a multiple of
  `FLEX_BUCKET` (as the compiled trunk pads to `train_transformer.compile_bucket`): one graph per
  length bucket over any number of random schedules, not one per length (tests/test_compile.py).

`Linear`: nn.Linear (same parameters and state_dict) with an optional tanh-GELU, which
- in CPU bf16 inference (sampling) runs as one oneDNN matmul on a cached bf16 copy of its weights with
  the GELU fused into it: under plain bf16 autocast each nn.Linear is an addmm whose output the next op
  reads again, and the MLP's GELU a separate pass over a hidden layer 4x wider than the stream; fused,
  fc1 + GELU is ~1.6x faster and the 4096-way head ~1.4x. Values: the same bf16 matmul with fp32
  accumulation; the fused GELU sees the unrounded accumulator (bf16 rounding).
- inside torch.compile traces matmul, bias and GELU as separate pointwise ops for inductor to fuse
  (`compiled_linear`), and is exactly nn.Linear (then GELU) everywhere else.

`smoothed_cross_entropy`: F.cross_entropy(label_smoothing=e)'s value with its gradient formed in the
forward, where the softmax is at hand: over V = 4096 classes that replaces log_softmax, its backward,
the smoothing sum, a fill and two full-size dtype casts.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------- attention
FLEX_BUCKET = 128          # FlexAttention pads sequences to a multiple of this: its block size
FLEX_GRAPHS = 64           # compiled flex kernels kept: length buckets x batch sizes x grad / no grad


def pick_attention(setting: str, device: torch.device, attn_dropout: bool) -> str:
    """`transformer.attention` resolved on `device`: 'auto' is 'plain' on CPU; on CUDA 'flex', or 'sdpa'
    while attention dropout is on (FlexAttention has none)."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "plain"
    return "sdpa" if attn_dropout else "flex"


def sdpa_attention(q_BHLc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor, bias_LS: torch.Tensor | None,
                   dropout_p: float) -> torch.Tensor:
    """model.attention through `F.scaled_dot_product_attention` (q pre-scaled, so scale 1)."""
    mask = None if bias_LS is None else bias_LS.to(q_BHLc.dtype)
    return F.scaled_dot_product_attention(q_BHLc, k_BHSc, v_BHSc, attn_mask=mask, dropout_p=dropout_p, scale=1.0)


def flex_block_mask(level_L: torch.Tensor):
    """The block-causal mask of model.block_causal_bias (query i may attend key j when level(j) <= level(i))
    as a FlexAttention BlockMask over the same (L,) scale levels."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_over_scales(b, h, q_idx, kv_idx):
        return level_L[q_idx] >= level_L[kv_idx]
    L = len(level_L)
    return create_block_mask(causal_over_scales, None, None, L, L, device=level_L.device)


@lru_cache(maxsize=None)
def compiled_flex_attention(backend: str):
    """flex_attention compiled with static shapes (`backend` inductor: the fused kernel on CUDA; eager
    flex_attention is a reference that materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, backend=backend)


def flex_attention(q_BHLc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor, block_mask,
                   dropout_p: float) -> torch.Tensor:
    """model.attention through FlexAttention with `flex_block_mask`. Cached generation steps (no mask: they
    attend to every cached key) go through `sdpa_attention`. Outside a compiled trunk the kernel is
    compiled here, one graph per input shape (inductor on CUDA; dynamo's eager backend on CPU, what
    eager flex_attention does itself), so the caller pads lengths to buckets of FLEX_BUCKET."""
    if block_mask is None:
        return sdpa_attention(q_BHLc, k_BHSc, v_BHSc, None, dropout_p)
    if dropout_p:
        raise ValueError("transformer.attention: flex has no attention dropout; set attn_drop_rate 0 or use sdpa")
    if torch.compiler.is_compiling():              # inside the compiled trunk: traced into its graph
        from torch.nn.attention.flex_attention import flex_attention as kernel
        return kernel(q_BHLc, k_BHSc, v_BHSc, block_mask=block_mask, scale=1.0)
    kernel = compiled_flex_attention("inductor" if q_BHLc.device.type == "cuda" else "eager")
    with torch._dynamo.config.patch(recompile_limit=FLEX_GRAPHS):
        return kernel(q_BHLc, k_BHSc, v_BHSc, block_mask=block_mask, scale=1.0)


ATTENTION = {"sdpa": sdpa_attention, "flex": flex_attention}     # 'plain' is model.attention
SEQ_BUCKET = {"flex": FLEX_BUCKET}                               # sequence padding each path needs (0: none)


# ---------------------------------------------------------------------------------------------- Linear
GELU_2K = 2 * math.sqrt(2 / math.pi)
ACTIVATIONS = {"none": ("none", [], ""), "gelu": ("gelu", [], "tanh")}   # oneDNN post-op (attr, scalars, algorithm)


@lru_cache(maxsize=1)
def has_fused_linear() -> bool:
    """Whether this PyTorch build has oneDNN's fused linear + activation op (x86 and most CPU builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_bf16_inference(x: torch.Tensor) -> bool:
    """True when `x` is on a CPU with oneDNN, no gradient is recorded and matmuls run in bf16 (bf16 input
    or bf16 autocast), outside torch.compile: where the fused oneDNN path applies."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or torch.is_grad_enabled() or not has_fused_linear():
        return False
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def tanh_gelu_as_sigmoid(y: torch.Tensor) -> torch.Tensor:
    """tanh-GELU, 0.5 y (1 + tanh(u)) with u = sqrt(2/pi) (y + 0.044715 y^3), written as y sigmoid(2u):
    the same function (0.5 (1 + tanh u) = sigmoid(2u)). What torch.compile traces instead of F.gelu:
    inductor's CPU code evaluates the exp-based sigmoid and its derivative about twice as fast as tanh
    (the MLP's hidden layer, forward and backward); values differ from F.gelu by fp32 rounding."""
    return y * torch.sigmoid(GELU_2K * (y + 0.044715 * y * y * y))


def compiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """What torch.compile traces for Linear: the matmul without its bias, then bias and activation as
    plain pointwise ops. Inductor fuses those into the next pointwise kernel (the GELU, the residual
    update, ...); an addmm would first copy the broadcast bias into its whole output (one extra pass
    per linear, forward and backward). Values: the bias is added to the rounded matmul instead of
    its accumulator (bf16 rounding)."""
    y = F.linear(x, weight)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return tanh_gelu_as_sigmoid(y) if act == "gelu" else y


class Linear(nn.Linear):
    """nn.Linear with an optional tanh-GELU (`act="gelu"`) and an optional bias given per call (`bias`,
    e.g. attention's q/zero/v bias): F.gelu(F.linear(x, weight, bias), approximate="tanh"), computed
    by oneDNN in CPU bf16 inference and traced as `compiled_linear` under torch.compile."""

    _bf16: tuple | None = None          # (stamp of the fp32 weights, bf16 weight, bf16 bias)

    def forward(self, x: torch.Tensor, act: str = "none", bias: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        if cpu_bf16_inference(x):
            w, b = self.bf16_weights(bias)
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), w, b, *ACTIVATIONS[act])
        if torch.compiler.is_compiling():
            return compiled_linear(x, self.weight, bias, act)
        y = F.linear(x, self.weight, bias)
        return F.gelu(y, approximate="tanh") if act == "gelu" else y

    def train(self, mode: bool = True) -> "Linear":
        """Drop the bf16 copy whenever the mode changes: an optimiser may update the weights in between
        without bumping their version counter (fused AdamW does not), so the stamp alone cannot see it."""
        self._bf16 = None
        return super().train(mode)

    def bf16_weights(self, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """bf16 weight (cast once, recast when the fp32 weight changes or the module changes mode) and bias
        (small: cast per call)."""
        stamp = (self.weight.data_ptr(), self.weight._version)
        if self._bf16 is None or self._bf16[0] != stamp:
            self._bf16 = (stamp, self.weight.detach().to(torch.bfloat16))
        return self._bf16[1], None if bias is None else bias.detach().to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- loss
class SmoothedCrossEntropy(torch.autograd.Function):
    """Mean label-smoothed cross-entropy of (N, V) logits, the value of F.cross_entropy(label_smoothing=e):
    mean over rows of lse(x) - (1 - e) x[target] - e mean(x), computed in fp32. Its gradient,
    softmax(x) - (1 - e) onehot - e / V over N, is formed in the forward (in the logits' dtype) while the
    softmax is at hand; the backward only scales it."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, smoothing: float) -> torch.Tensor:
        x_NV = logits_NV.float()
        N, V = x_NV.shape
        lse_N = torch.logsumexp(x_NV, dim=-1)
        picked_N = x_NV.gather(1, target_N[:, None]).squeeze(1)
        loss = (lse_N - (1.0 - smoothing) * picked_N - smoothing * x_NV.mean(-1)).mean()
        grad_NV = (x_NV - lse_N[:, None]).exp_()
        if smoothing:
            grad_NV.sub_(smoothing / V)
        grad_NV.scatter_add_(1, target_N[:, None], grad_NV.new_full((N, 1), smoothing - 1.0))
        ctx.save_for_backward(grad_NV.div_(N).to(logits_NV.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_NV,) = ctx.saved_tensors
        return grad_NV * grad_loss.to(grad_NV.dtype), None, None


def smoothed_cross_entropy(logits_NV: torch.Tensor, target_N: torch.Tensor, smoothing: float) -> torch.Tensor:
    """F.cross_entropy(logits.float(), target, label_smoothing=smoothing) (fp32), gradient in the logits' dtype."""
    return SmoothedCrossEntropy.apply(logits_NV, target_N, float(smoothing))
