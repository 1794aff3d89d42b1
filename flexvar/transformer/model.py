"""FlexVAR transformer: class-conditional, scale-wise autoregressive, block-causal over scales.

A sequence is the concatenation of token maps of increasing scale (h_1, w_1) ... (h_K, w_K).
Step k's input tokens are scale k-1's quantised map brought to scale k (see
flexvar/transformer/teacher_forcing.py); its output logits predict scale k's token map. The first step's
input is the class embedding plus a learnt start vector. A token attends to its own scale and
every coarser one (block-causal), so one teacher-forced pass trains all steps, and generation
runs one scale at a time with a KV cache.

Blocks follow VAR: AdaLN self-attention (six modulation vectors from the class condition:
gamma/scale/shift for the attention and the MLP branches), q and k l2-normalised with a learnt
per-head scale, tanh-GELU MLP, drop-path rising linearly over depth, AdaLN before the head.
FlexVAR differences: no step (level) embedding, and a scalable 2D position embedding — one
learnable (C, P, P) map, initialised with 2D sin-cos, resized to each scale's (h, w).

This file is the method, one plain path per operation. Faster ways to compute the same functions (the
CUDA attention kernels, oneDNN-fused linears in CPU bf16 inference, a loss with its gradient formed in
the forward) live in flexvar/transformer/fast_paths.py, picked by `transformer.attention` and the device,
and tested to compute what the plain path computes.

    >>> from flexvar.config import TransformerConfig
    >>> m = FlexVAR(TransformerConfig(depth=2), vocab_size=16, codebook_dim=4, num_classes=3, pe_size=4)
    >>> scales = [(1, 1), (2, 3), (4, 4)]
    >>> m(torch.tensor([0, 2]), torch.zeros(2, 6 + 16, 4), scales).shape
    torch.Size([2, 23, 16])
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from flexvar.config import TransformerConfig
from flexvar.transformer import fast_paths
from flexvar.transformer.fast_paths import Linear   # nn.Linear (+ tanh-GELU), fused where that is faster

Scales = list[tuple[int, int]]
LN_EPS = 1e-6
MAX_LOG_ATTN_SCALE = math.log(100.0)
# official initialisation (VAR/FlexVAR): head weights x0.02, AdaLN weights x0.5, gammas x1e-5
INIT_HEAD, INIT_ADALN = 0.02, 0.5     # gammas: x TransformerConfig.adaln_gamma_init


def layer_norm(x_BLC: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters: AdaLN supplies scale and shift."""
    return F.layer_norm(x_BLC, x_BLC.shape[-1:], eps=LN_EPS)


def unit_rows(x_BHLc: torch.Tensor, scale_1H11: torch.Tensor | None = None) -> torch.Tensor:
    """x / max(||x||, eps) over the last axis (F.normalize), times an optional per-head scale: one multiply
    by the (B, H, L, 1) factor rsqrt(max(sum x^2, eps^2)) * scale, in fp32, rounded once to x's dtype."""
    x32_BHLc = x_BHLc.float()                         # one cast (a no-op in fp32), used twice
    inv_BHL1 = torch.rsqrt(x32_BHLc.square().sum(dim=-1, keepdim=True).clamp_min(1e-24))
    if scale_1H11 is not None:
        inv_BHL1 = inv_BHL1 * scale_1H11
    return (x32_BHLc * inv_BHL1).to(x_BHLc.dtype)


def modulate(x_BLC: torch.Tensor, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor) -> torch.Tensor:
    """AdaLN: LN(x) (1 + scale) + shift. The small (B, 1, C) factors are brought to the stream's dtype
    first (under bf16 autocast they come out of a linear in bf16), so the full-size products run
    in one dtype instead of the slow mixed-dtype path; values are the same."""
    return layer_norm(x_BLC) * (1 + scale_B1C).to(x_BLC.dtype) + shift_B1C.to(x_BLC.dtype)


def gated(x_BLC: torch.Tensor, h_BLC: torch.Tensor, gamma_B1C: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Residual update x + drop_path(h gamma), the product cast to the stream's dtype before the
    add (same values as the mixed-dtype add, on the fast same-dtype path)."""
    return x_BLC + drop_path(h_BLC * gamma_B1C, p, training).to(x_BLC.dtype)


def drop_path(x_BLC: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples, rescale the rest."""
    if p == 0.0 or not training:
        return x_BLC
    keep_B11 = x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(1.0 - p)
    return x_BLC * keep_B11 / (1.0 - p)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """2D sin-cos position map (dim, h, w): the first half of the channels encodes rows, the second columns."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half // 2, dtype=torch.float64) / max(half // 2, 1))

    def encode(n: int) -> torch.Tensor:   # (half, n)
        ang = torch.arange(n, dtype=torch.float64)[None] * freqs[:, None]
        return torch.cat([ang.sin(), ang.cos()], dim=0)

    out = torch.zeros(dim, h, w, dtype=torch.float64)
    out[: 2 * (half // 2)] = encode(h)[:, :, None].expand(-1, h, w)
    out[half: half + 2 * (half // 2)] = encode(w)[:, None, :].expand(-1, h, w)
    return out.float()


def sincos_2d_interleaved(dim: int, h: int, w: int) -> torch.Tensor:
    """The official FlexVAR initial map (dim, h, w): even channels sin(row * f_k), odd channels
    cos(col * f_k), f_k = 10000^(-2k/dim) (models/flexvar.py generate_2d_rotary_position_embedding)."""
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    out = torch.zeros(dim, h, w)
    out[0::2] = torch.sin(torch.arange(h, dtype=torch.float32)[None, :, None] * freqs[:, None, None]).expand(-1, h, w)
    out[1::2] = torch.cos(torch.arange(w, dtype=torch.float32)[None, None, :] * freqs[:, None, None]).expand(-1, h, w)
    return out


def scale_levels(scales: tuple[tuple[int, int], ...], pad_to: int = 0) -> torch.Tensor:
    """(L,) step index of every token; `pad_to` > L appends padding tokens at level K (after every scale)."""
    level_L = torch.cat([torch.full((h * w,), k) for k, (h, w) in enumerate(scales)])
    if pad_to > len(level_L):
        level_L = torch.cat([level_L, torch.full((pad_to - len(level_L),), len(scales))])
    return level_L


def block_causal_bias(level_L: torch.Tensor) -> torch.Tensor:
    """The block-causal mask as an additive fp32 (L, L) matrix: query token i may attend key j (0) when
    scale(j) <= scale(i), else -inf. Padding tokens (level K) sit after the last scale: no real token
    sees them, they see everything."""
    return torch.where(level_L[:, None] >= level_L[None, :], 0.0, float("-inf"))


@lru_cache(maxsize=32)     # fp32 (L, L) each: 29 MB at L = 2,700 (512 px)
def attention_mask(kind: str, scales: tuple[tuple[int, int], ...], device: str, pad_to: int = 0):
    """The block-causal mask of `scales` (padded to `pad_to` tokens) as attention `kind` takes it, built
    once per schedule: `block_causal_bias`, or for 'flex' a block-sparse BlockMask of the same levels."""
    level_L = scale_levels(scales, pad_to).to(device)
    return fast_paths.flex_block_mask(level_L) if kind == "flex" else block_causal_bias(level_L)


def attention(q_BHLc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor, bias_LS: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    """softmax(q k^T + bias) v with attention dropout; q arrives pre-scaled (unit rows times the head's
    learnt scale), `bias_LS` is `block_causal_bias` (None: attend to every key, the KV-cached steps).
    In bf16 the softmax accumulates in fp32 and rounds once."""
    logits_BHLS = q_BHLc @ k_BHSc.transpose(-2, -1)
    if bias_LS is not None:
        logits_BHLS = logits_BHLS + bias_LS.to(logits_BHLS.dtype)
    probs_BHLS = F.dropout(logits_BHLS.softmax(dim=-1), dropout_p)
    return probs_BHLS @ v_BHSc


class SelfAttention(nn.Module):
    """Multi-head attention with l2-normalised q/k and a learnt per-head temperature; optional KV cache."""

    def __init__(self, width: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width), persistent=False)
        self.log_scale_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = Linear(width, width)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kv_cache: list[torch.Tensor] | None = None   # [k_BHLc, v_BHLc] while caching

    def forward(self, x_BLC: torch.Tensor, mask_LL, attend=attention) -> torch.Tensor:
        """`attend`: `attention`, or a speed path computing it (fast_paths), with `mask_LL` in its form."""
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv_BL3C = self.qkv(x_BLC, bias=bias)
        q, k, v = (rearrange(t, "b l (h c) -> b h l c", h=self.heads) for t in qkv_BL3C.chunk(3, dim=-1))
        q = unit_rows(q, self.log_scale_1H11.clamp(max=MAX_LOG_ATTN_SCALE).exp())
        k = unit_rows(k)
        if self.kv_cache is not None:
            if self.kv_cache:
                k = torch.cat([self.kv_cache[0], k], dim=2)
                v = torch.cat([self.kv_cache[1], v], dim=2)
            self.kv_cache[:] = [k, v]
        out = attend(q, k, v, mask_LL, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h l c -> b l (h c)")))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)
        self.drop = nn.Dropout(drop)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.fc1(x_BLC, act="gelu")))


class AdaLNBlock(nn.Module):
    """x + gamma1 * attn(LN(x)(1+scale1)+shift1); x + gamma2 * mlp(LN(x)(1+scale2)+shift2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.width, self.drop_path = width, drop_path
        self.ada_lin = Linear(width, 6 * width)   # order: gamma1, gamma2, scale1, scale2, shift1, shift2
        self.attn = SelfAttention(width, heads, attn_drop, drop)
        self.mlp = MLP(width, round(width * mlp_ratio), drop)
        self.mod_cache: torch.Tensor | None = None    # cached generation: the modulation of its condition

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, 6C) AdaLN vectors of the condition. While generating with the KV cache the condition is
        the same at every step, so they are computed at the first step and reused (enable_kv_cache clears them)."""
        if self.attn.kv_cache is None:
            return self.ada_lin(F.silu(cond_BD))
        if self.mod_cache is None:
            self.mod_cache = self.ada_lin(F.silu(cond_BD))
        return self.mod_cache

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, mask_LL, attend=attention) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = rearrange(self.modulation(cond_BD), "b (six c) -> six b 1 c", six=6)
        x_BLC = gated(x_BLC, self.attn(modulate(x_BLC, s1, b1), mask_LL, attend), g1, self.drop_path, self.training)
        return gated(x_BLC, self.mlp(modulate(x_BLC, s2, b2)), g2, self.drop_path, self.training)


class FlexVAR(nn.Module):
    """The FlexVAR transformer (see module docstring).

    `vocab_size`, `codebook_dim` come from the tokenizer, `num_classes` from the data (one more
    embedding row is the null class used for classifier-free guidance), `pe_size` P from the
    largest latent side trained on (the position map is P x P).
    """

    def __init__(self, cfg: TransformerConfig, vocab_size: int, codebook_dim: int, num_classes: int, pe_size: int):
        super().__init__()
        self.cfg = cfg
        self.depth = cfg.depth
        self.width = C = cfg.width or 64 * cfg.depth
        self.heads = cfg.heads or cfg.depth
        self.vocab_size, self.codebook_dim, self.num_classes, self.pe_size = vocab_size, codebook_dim, num_classes, pe_size
        self.class_dropout = cfg.class_dropout
        dpr = cfg.drop_path_rate if cfg.drop_path_rate is not None else 0.1 * cfg.depth / 24

        self.word_embed = Linear(codebook_dim, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        pos = (sincos_2d if cfg.pos_embed_init == "halves" else sincos_2d_interleaved)(C, pe_size, pe_size)[None]
        if cfg.pos_embed_learnable:
            self.pos_1CPP = nn.Parameter(pos)
        else:
            self.register_buffer("pos_1CPP", pos)
        self.blocks = nn.ModuleList([
            AdaLNBlock(C, self.heads, cfg.mlp_ratio, cfg.drop_rate, cfg.attn_drop_rate,
                       dpr * i / max(cfg.depth - 1, 1))
            for i in range(cfg.depth)])
        self.head_ada_lin = Linear(C, 2 * C)   # order: scale, shift
        self.head = Linear(C, vocab_size)
        self.seq_bucket = 0         # > 0: sequences padded to a multiple of this (compile_trunk)
        self._compiled_trunk = self._compiled_head = None
        if not self.pos_1CPP.is_meta:
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """VAR/FlexVAR initialisation: truncated normal std sqrt(1/3C); output projections scaled
        by 1/sqrt(2 depth); AdaLN near identity (gammas x adaln_gamma_init) so every block starts as a no-op."""
        std = math.sqrt(1 / self.width / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std)
        self.head.weight.mul_(INIT_HEAD)
        self.head_ada_lin.weight.mul_(INIT_ADALN)
        C = self.width
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            blk.mlp.fc2.weight.div_(math.sqrt(2 * self.depth))
            blk.ada_lin.weight[2 * C:].mul_(INIT_ADALN)
            blk.ada_lin.weight[: 2 * C].mul_(self.cfg.adaln_gamma_init)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ embeddings
    def pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        """Position embedding of one scale, (1, h*w, C).

        scalable: the P x P map resized to (h, w) — area when shrinking and, as the official code,
        area when growing too (`pos_embed_grow: bicubic` is this project's smoother alternative) —
        so every scale spans the same image extent; fixed: the top-left (h, w) crop — absolute
        positions, the fixed-length baseline of the paper's Tab. 6.
        """
        h, w = hw
        P = self.pe_size
        if self.cfg.pos_embed == "fixed":
            if h > P or w > P:
                raise ValueError(f"fixed position embedding covers {P}x{P}; scale {hw} is larger")
            pos = self.pos_1CPP[:, :, :h, :w]
        elif (h, w) == (P, P):
            pos = self.pos_1CPP
        elif (h <= P and w <= P) or self.cfg.pos_embed_grow == "area":
            pos = F.interpolate(self.pos_1CPP, size=(h, w), mode="area")
        else:
            pos = F.interpolate(self.pos_1CPP, size=(h, w), mode="bicubic", align_corners=False)
        return rearrange(pos, "1 c h w -> 1 (h w) c")

    def class_cond(self, label_B: torch.Tensor) -> torch.Tensor:
        """Class condition (B, C); label == num_classes is the null (unconditional) class."""
        return self.class_emb(label_B)

    def drop_labels(self, label_B: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class with probability class_dropout (training only; global RNG)."""
        if not self.training or self.class_dropout == 0.0:
            return label_B
        drop_B = torch.rand(label_B.shape, device=label_B.device) < self.class_dropout
        return torch.where(drop_B, torch.full_like(label_B, self.num_classes), label_B)

    def step_input(self, cond_BD: torch.Tensor, hw: tuple[int, int], x_BlCv: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded input tokens (B, h*w, C) of one step at scale hw.

        First step (x_BlCv None): class condition + start vector on every position. Later steps:
        `x_BlCv` are the previous scale's code vectors already brought to (h, w) (flattened).
        """
        pos = self.pos_embed(hw)
        if x_BlCv is None:
            return (cond_BD[:, None, :] + self.pos_start) + pos
        return self.word_embed(x_BlCv) + pos

    def embed_sequence(self, cond_BD: torch.Tensor, x_BLCv: torch.Tensor, scales: Scales) -> torch.Tensor:
        """All steps' input tokens (B, L, C) from the first step's condition and later steps' inputs."""
        parts, start = [self.step_input(cond_BD, scales[0])], 0
        for hw in scales[1:]:
            n = hw[0] * hw[1]
            parts.append(self.step_input(cond_BD, hw, x_BLCv[:, start:start + n]))
            start += n
        if start != x_BLCv.shape[1]:
            raise ValueError(f"inputs hold {x_BLCv.shape[1]} tokens; scales {scales[1:]} need {start}")
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ forward
    def logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = rearrange(self.head_ada_lin(F.silu(cond_BD)), "b (two c) -> two b 1 c", two=2)
        return self.head(modulate(x_BLC, scale, shift))

    def forward(self, label_B: torch.Tensor, x_BLCv: torch.Tensor, scales: Scales) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) for every step of `scales`.

        `x_BLCv` (B, L - h_1*w_1, Cvae): inputs of steps 2..K (teacher_forcing.build_inputs).
        In training mode labels are dropped to the null class with probability class_dropout.
        With `seq_bucket` set (compile_trunk; FlexAttention pads to its own bucket), the blocks run on the
        sequence zero-padded to a multiple of it (padding attends only to itself and later, no real token
        attends to it; its outputs are cut before the head), so a compiled trunk or kernel sees a handful
        of shapes however many schedules are drawn.
        """
        cond_BD = self.class_cond(self.drop_labels(label_B))
        x_BLC = self.embed_sequence(cond_BD, x_BLCv.to(cond_BD.dtype), scales)
        kind, attend = self.attention_path(x_BLC.device)
        L = x_BLC.shape[1]
        bucket = self.seq_bucket or fast_paths.SEQ_BUCKET.get(kind, 0)
        L_pad = -(-L // bucket) * bucket if bucket else L
        x_BLC = F.pad(x_BLC, (0, 0, 0, L_pad - L))
        mask = attention_mask(kind, tuple(map(tuple, scales)), str(x_BLC.device), L_pad)
        x_BLC = (self._compiled_trunk or self.run_blocks)(x_BLC, cond_BD, mask, attend)
        return (self._compiled_head or self.logits)(x_BLC[:, :L], cond_BD)

    def run_blocks(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, mask_LL, attend=attention) -> torch.Tensor:
        """The transformer blocks (the part torch.compile compiles, see compile_trunk)."""
        for blk in self.blocks:
            x_BLC = blk(x_BLC, cond_BD, mask_LL, attend)
        return x_BLC

    def attention_path(self, device: torch.device) -> tuple[str, Callable]:
        """(kind, function) of the attention `transformer.attention` picks on `device`: the plain `attention`
        ('plain'; 'auto' on CPU) or a speed path of fast_paths.py computing it ('sdpa', 'flex'; 'auto' on CUDA)."""
        attn_dropout = self.training and self.cfg.attn_drop_rate > 0
        kind = fast_paths.pick_attention(self.cfg.attention, device, attn_dropout)
        return kind, fast_paths.ATTENTION.get(kind, attention)

    def compile_trunk(self, seq_bucket: int, backend: str = "inductor") -> None:
        """torch.compile the blocks and the head for training with random schedules.

        Blocks: seq_bucket > 0 pads every sequence to a multiple of it and compiles static shapes (one
        graph per bucket); 0 compiles one graph with a dynamic sequence length. Head (AdaLN + the
        V-way linear, on the real tokens only): one graph with a dynamic length — padding it too would
        spend the widest matmul on tokens that are cut. The embeddings (a different interpolation per
        scale) stay eager."""
        self.seq_bucket = seq_bucket
        self._compiled_trunk = torch.compile(self.run_blocks, dynamic=seq_bucket == 0, backend=backend)
        self._compiled_head = torch.compile(self.logits, dynamic=True, backend=backend)

    # ------------------------------------------------------------------ generation
    def enable_kv_cache(self, enabled: bool) -> None:
        """Start (empty) or stop key/value caching in every block (and the per-sample AdaLN modulation
        cache); generation calls this around a sample."""
        for blk in self.blocks:
            blk.attn.kv_cache = [] if enabled else None
            blk.mod_cache = None

    def step_logits(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Logits (B, h*w, V) of one step from its embedded inputs (`step_input`), attending to the
        cached keys/values of all previous steps. Call steps in order after enable_kv_cache(True)."""
        if self.blocks[0].attn.kv_cache is None:
            raise RuntimeError("step_logits needs enable_kv_cache(True) first")
        _, attend = self.attention_path(x_BlC.device)
        for blk in self.blocks:
            x_BlC = blk(x_BlC, cond_BD, None, attend)
        return self.logits(x_BlC, cond_BD)


def build_flexvar(cfg: TransformerConfig, vocab_size: int, codebook_dim: int, num_classes: int,
                  pe_size: int, device: str | torch.device = "cpu") -> FlexVAR:
    """FlexVAR on `device` ('meta' builds shapes only, e.g. to count parameters of large presets)."""
    with torch.device(device):
        return FlexVAR(cfg, vocab_size, codebook_dim, num_classes, pe_size)
