"""`Linear`: nn.Linear (same parameters, same state_dict) that runs CPU bf16 inference as one oneDNN
matmul on a cached bf16 copy of its weights, with the MLP's tanh-GELU fused into it.

Why: sampling on a CPU is a few hundred small matmuls. Under plain bf16 autocast each nn.Linear is an
addmm whose output the next op reads again, and the MLP's GELU is a separate pass over a hidden layer
4x wider than the stream. oneDNN's linear with a post-op applies GELU to the fp32 accumulator before
the bf16 store (one pass instead of three; ~1.6x faster for fc1 + GELU) and its kernels run the
4096-way head ~1.4x faster than addmm. Values: the same bf16 matmul with fp32 accumulation; the fused
GELU sees the unrounded accumulator, so outputs differ from Linear-then-GELU by bf16 rounding only.

Everywhere else — gradients recorded, fp32, CUDA, or a build without oneDNN — it is exactly nn.Linear
(then GELU). Inside torch.compile (which fuses by itself) it traces the matmul, bias and GELU as
separate ops for inductor to fuse (`compiled_linear`).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

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
    e.g. attention's q/zero/v bias); see the module docstring for the CPU bf16 inference path."""

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

    def bf16_weights(self, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """bf16 weight (cast once, recast when the fp32 weight changes) and bias (small: cast per call)."""
        stamp = (self.weight.data_ptr(), self.weight._version)
        if self._bf16 is None or self._bf16[0] != stamp:
            self._bf16 = (stamp, self.weight.detach().to(torch.bfloat16))
        return self._bf16[1], None if bias is None else bias.detach().to(torch.bfloat16)
