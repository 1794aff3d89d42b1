"""Training with torch.compile despite random schedules, and the block-sparse (FlexAttention) mask.

* Padding to a sequence-length bucket changes nothing: real tokens never attend to padding and the
  padded outputs are cut before the head (logits equal the unpadded model's).
* The compiled (inductor) training step — blocks, head and loss compiled — gives the eager step's loss
  and gradients on a tiny model.
* Over 50 random schedules the compiled trunk is traced once per length bucket (or once with dynamic
  shapes), the head and the loss once each (dynamic lengths), counted by torch._dynamo's own counters
  — not once per schedule.
* FlexAttention with the cached BlockMask computes what the dense SDPA reference does (CPU: forward).
* The attention `transformer.attention: auto` picks on CUDA (FlexAttention, its kernel compiled with
  static shapes) captures one graph per length bucket over 50 random schedules, compiled trunk or not
  (on CPU the kernel is compiled with dynamo's eager backend: the same guards and captures).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from flexvar.config import ScheduleConfig, TrainTransformerConfig, TransformerConfig
from flexvar.tokenizer.quantizer import MultiScaleQuantizer
from flexvar.transformer import fast_paths
from flexvar.transformer.model import FlexVAR, attention_mask
from flexvar.schedules import ScheduleSampler, num_tokens
from flexvar.transformer.training import compiled_token_loss, token_loss
from flexvar.transformer.teacher_forcing import inputs_targets

SCALES = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8)]        # 103 tokens


def tiny(**kw) -> FlexVAR:
    torch.manual_seed(0)
    m = FlexVAR(TransformerConfig(depth=2, width=32, heads=2, drop_path_rate=0.0, class_dropout=0.0, **kw),
                64, 8, 4, pe_size=8)
    with torch.no_grad():   # non-trivial AdaLN gammas so the blocks matter numerically
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch(scales, n: int = 4):
    torch.manual_seed(1)                                     # the quantizer's codebook and the latents
    z = torch.randn(n, 8, 8, 8)
    x, tgt = inputs_targets("gt", MultiScaleQuantizer(64, 8), z, scales)
    return torch.arange(n) % 4, x, tgt


def step(model: FlexVAR, scales, loss_fn=token_loss) -> tuple[float, list[torch.Tensor]]:
    """The training step's loss and gradients (what forward_backward computes)."""
    model.zero_grad(set_to_none=True)
    labels, x, tgt = batch(scales)
    loss = loss_fn(model(labels, x, scales), tgt, TrainTransformerConfig().label_smoothing)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def test_padding_to_a_bucket_changes_nothing():
    ref, padded = tiny().eval(), tiny().eval()
    padded.seq_bucket = 64                                   # 103 -> 128 tokens
    labels, x, _ = batch(SCALES)
    torch.testing.assert_close(padded(labels, x, SCALES), ref(labels, x, SCALES), rtol=1e-5, atol=1e-6)


def test_compiled_step_equals_eager_step():
    torch.set_num_threads(1)
    eager, compiled = tiny().train(), tiny().train()
    compiled.compile_trunk(64)                               # inductor, static shapes, 103 -> 128 tokens
    loss_e, grads_e = step(eager, SCALES)
    loss_c, grads_c = step(compiled, SCALES, compiled_token_loss())
    print(f"compiled vs eager step: |loss diff| = {abs(loss_c - loss_e):.2e}, "
          f"max |grad diff| = {max(float((a - b).abs().max()) for a, b in zip(grads_c, grads_e)):.2e}")
    assert abs(loss_c - loss_e) <= 1e-5
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bucket", [32, 0])
def test_recompiles_over_50_random_schedules(bucket):
    """Graph captures over 50 random 8x8 schedules (11 distinct lengths in 78..155 tokens): the blocks
    one per bucket of 32 (96 / 128 / 160), or one with a dynamic sequence length; head and loss one each."""
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    model = tiny().train()
    model.compile_trunk(bucket, backend="eager")             # dynamo's guards and captures are the same per backend
    sampler = ScheduleSampler(ScheduleConfig(), (8, 8), 0)
    lengths = set()
    for _ in range(50):
        scales = sampler.sample()
        lengths.add(num_tokens(scales))
        step(model, scales, compiled_token_loss("eager"))
    graphs = counters["stats"]["unique_graphs"]
    buckets = {-(-n // bucket) for n in lengths} if bucket else {0}
    print(f"bucket {bucket}: {len(lengths)} distinct lengths over 50 schedules -> {graphs} compiled graphs")
    assert len(lengths) > len(buckets)
    assert graphs == len(buckets) + 2


def test_flex_attention_matches_sdpa_reference():
    """The block-sparse FlexAttention path (cached BlockMask) and the dense SDPA path agree (CPU: forward)."""
    sdpa, flex = tiny(attention="sdpa").eval(), tiny(attention="flex").eval()
    labels, x, _ = batch(SCALES)
    with torch.no_grad():
        torch.testing.assert_close(flex(labels, x, SCALES), sdpa(labels, x, SCALES), rtol=1e-5, atol=1e-5)
        flex.seq_bucket = sdpa.seq_bucket = 64               # padded as in compiled training
        torch.testing.assert_close(flex(labels, x, SCALES), sdpa(labels, x, SCALES), rtol=1e-5, atol=1e-5)
    key = ("flex", tuple(SCALES), "cpu", 128)
    assert attention_mask(*key) is attention_mask(*key)      # built once per schedule, then cached


def test_flex_block_masks_do_not_recompile_per_schedule():
    """The CUDA path's compiled trunk with FlexAttention: a new cached BlockMask per schedule is a graph
    input, not a new graph — over 50 random schedules block captures stay one per length bucket (forward
    only: CPU flex has no backward)."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny(attention="flex").eval()
    model.compile_trunk(32, backend="eager")
    sampler = ScheduleSampler(ScheduleConfig(), (8, 8), 0)
    lengths = set()
    with torch.no_grad():
        for _ in range(50):
            scales = sampler.sample()
            lengths.add(num_tokens(scales))
            labels, x, _ = batch(scales, 2)
            model(labels, x, scales)
    head_graphs = 1                                          # the head: one graph, dynamic length
    assert len(lengths) > 2 and counters["stats"]["unique_graphs"] == len({-(-n // 32) for n in lengths}) + head_graphs


def test_cuda_auto_attention_compiles_one_graph_per_length_bucket_over_50_random_schedules():
    """FlexAttention, what `auto` picks on CUDA for training (no attention dropout), in an uncompiled
    trunk (every preset's train_transformer.compile: false): its kernel is compiled with static shapes,
    so sequences are padded to buckets of FLEX_BUCKET tokens and 50 schedules drawn by the training
    sampler over a 16x16 latent (dozens of lengths) make at most one graph per bucket — not one per
    length, which would pass dynamo's recompile limit and fall back to the unfused kernel."""
    assert fast_paths.pick_attention("auto", torch.device("cuda"), attn_dropout=False) == "flex"
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = FlexVAR(TransformerConfig(depth=1, width=16, heads=2, drop_path_rate=0.0, class_dropout=0.0,
                                      attention="flex"), 64, 8, 4, pe_size=16).train()
    sampler = ScheduleSampler(ScheduleConfig(), (16, 16), 0)
    quantizer, z = MultiScaleQuantizer(64, 8), torch.randn(2, 8, 16, 16)
    lengths = set()
    with torch.no_grad():                                    # CPU FlexAttention has no backward
        for _ in range(50):
            scales = sampler.sample()
            lengths.add(num_tokens(scales))
            x, _ = inputs_targets("gt", quantizer, z, scales)
            model(torch.arange(2), x, scales)
    graphs = counters["stats"]["unique_graphs"]
    buckets = {-(-n // fast_paths.FLEX_BUCKET) for n in lengths}
    print(f"flex, uncompiled trunk: {len(lengths)} distinct lengths over 50 schedules, {len(buckets)} buckets "
          f"-> {graphs} compiled graphs")
    assert len(lengths) > 2 * len(buckets) and 1 <= graphs <= len(buckets)

