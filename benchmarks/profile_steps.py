"""Where the time goes: our bf16 train step and sampling step profiled by operator class, printed as
JSON and as a markdown table, held against the matmul rate measured in the same run.

    python -m benchmarks.profile_steps [--steps 5] [--what train sample]

torch.profiler records every ATen operator's own (self) CPU time and, in one more profiled step that
records shapes, the FLOPs of matmuls and convolutions. Operators are grouped into classes (matmul,
attention, norms, activations, loss, optimizer, casts/copies, elementwise, sampling, decode convs,
other). `headroom`: the step's time if every matmul/conv ran at the square-matmul rate measured here
and everything else took no time — the floor no kernel fusion can beat. Same setting as
benchmarks/bench_transformer.py and benchmarks/bench_sample.py (d6 / 384 / 6 heads, V 4096; batch 8
for training, 16 for sampling with the VQ-16 decoder at 128 px). The compiled train step
(`train_transformer.compile`) is profiled with inductor's kernel profiling on: its fused kernels are
one class, its matmuls (extern calls) count as matmul. With FLEXVAR_OFFICIAL_DIR set, the official
code's train step and sampling under bf16 autocast are profiled beside ours (its matmul seconds bound
what any lead over it can be).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile


from benchmarks.bench_sample import build as build_sampler
from benchmarks.bench_sample import official_samplers, sampler
from benchmarks.bench_transformer import official as official_train_steps
from benchmarks.bench_transformer import ours as our_train_steps
from benchmarks.side_by_side import add_threads_arg, machine, official_modules, setup_process

# first match wins; names are ATen operator names as the profiler reports them
CLASSES = [
    ("compiled fused kernels", r"^graph_\d+_cpp_fused|CompiledFxGraph"),   # inductor's kernels and graph wrapper
    ("decode convs", r"conv|upsample|group_norm|native_group_norm"),
    ("matmul", r"^aten::(mm|addmm|bmm|baddbmm|linear|matmul|_addmm_activation)$|mkldnn.*(linear|matmul)"),
    ("loss", r"log_softmax|nll_loss|cross_entropy"),
    ("attention", r"^aten::(_?softmax|_softmax_backward_data|masked_fill)$|scaled_dot_product|flash"),
    ("norms", r"layer_norm|linalg_vector_norm|norm\b|clamp_min|rsqrt"),
    ("activations", r"gelu|silu|tanh"),
    ("optimizer", r"adam|_foreach|lerp|addcdiv|addcmul|sqrt"),
    ("casts/copies", r"^aten::(to|_to_copy|copy_|clone|contiguous|cat|empty_like)$"),
    ("sampling", r"topk|multinomial|sort|argmax|gather|scatter|cumsum|index"),
    ("elementwise", r"^aten::(add|add_|mul|mul_|div|div_|sub|rsub|neg|exp|where|fill_|zero_|sum|mean|pow)$"),
]


TOP = 0   # --top N: also list the N most expensive operators


def op_class(name: str) -> str:
    for cls, pattern in CLASSES:
        if re.search(pattern, name):
            return cls
    return "other"


def op_flops(prof) -> float:
    """Matmul/conv FLOPs of a profile, each operator counted once: the profiler's own count, except that an
    operator re-dispatched to itself (autocast's conv2d calls conv2d) is skipped, plus oneDNN's fused
    linear (which the profiler does not count) from its recorded shapes."""
    total = 0.0
    for ev in prof.events():
        parent = ev.cpu_parent
        if ev.flops and not (parent is not None and parent.name == ev.name):
            total += ev.flops
        elif ev.name.endswith("_linear_pointwise") and ev.input_shapes:
            x, w = ev.input_shapes[0], ev.input_shapes[1]
            total += 2 * math.prod(x[:-1]) * x[-1] * w[0]
    return total


def profiled(fn, steps: int) -> tuple[dict[str, float], float, float]:
    """(seconds per step by class, matmul/conv FLOPs per step, profiled seconds per step) of `fn`.

    Times come from a plain profile; the FLOPs from one more step profiled with shapes and FLOPs
    recorded. Recording shapes slows some operators by itself (our decoder's convolutions ~1.7x, its
    group norms ~12x on one thread), so a profile that records them misstates where the time goes."""
    fn()                                               # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as counted:
        fn()
    flops = op_flops(counted)
    by_class: dict[str, float] = {}
    for ev in prof.key_averages():
        cls = op_class(ev.key)
        by_class[cls] = by_class.get(cls, 0.0) + ev.self_cpu_time_total / 1e6 / steps
    if TOP:
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:TOP]
        print("\n".join(f"{e.key:45s} {op_class(e.key):14s} {e.self_cpu_time_total / 1e6 / steps:.4f} s  x{e.count // steps}"
                        for e in top), file=sys.stderr)
    wall = sum(by_class.values())
    return dict(sorted(by_class.items(), key=lambda kv: -kv[1])), flops, wall


def report(name: str, fn, steps: int, peak_gflops: float) -> dict:
    by_class, flops, total = profiled(fn, steps)
    dense = by_class.get("matmul", 0.0) + by_class.get("decode convs", 0.0)
    return {"step": name, "total_s": round(total, 4), "gflop": round(flops / 1e9, 1),
            "by_class_s": {k: round(v, 4) for k, v in by_class.items()},
            "share": {k: round(v / total, 3) for k, v in by_class.items()},
            "matmul_conv_gflops_achieved": round(flops / max(dense, 1e-9) / 1e9, 1),
            "floor_s_at_measured_peak": round(flops / (peak_gflops * 1e9), 4),
            "headroom_x": round(total / (flops / (peak_gflops * 1e9)), 2)}


def markdown(rows: list[dict]) -> str:
    classes = sorted({c for r in rows for c in r["by_class_s"]}, key=lambda c: -max(r["by_class_s"].get(c, 0) for r in rows))
    head = "| class | " + " | ".join(r["step"] for r in rows) + " |"
    lines = [head, "|---|" + "---:|" * len(rows)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{r['by_class_s'].get(c, 0):.3f} s ({100 * r['share'].get(c, 0):.0f}%)"
                                              for r in rows) + " |")
    lines.append("| **total (profiled self time)** | " + " | ".join(f"**{r['total_s']:.3f} s**" for r in rows) + " |")
    lines.append("| matmul/conv GFLOP | " + " | ".join(f"{r['gflop']}" for r in rows) + " |")
    lines.append("| achieved matmul/conv GFLOP/s | " + " | ".join(f"{r['matmul_conv_gflops_achieved']}" for r in rows) + " |")
    lines.append("| floor at measured bf16 peak | " + " | ".join(f"{r['floor_s_at_measured_peak']:.3f} s" for r in rows) + " |")
    lines.append("| total / floor | " + " | ".join(f"{r['headroom_x']}x" for r in rows) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="profiled steps averaged per variant (after one warm-up step)")
    ap.add_argument("--what", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    ap.add_argument("--top", type=int, default=0, help="also list the N most expensive operators")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    setup_process(args)
    global TOP
    TOP = args.top
    mach = machine()
    mods, note = official_modules()
    print(f"[profile_steps] {note}", file=sys.stderr, flush=True)
    peak, rows = mach["matmul_gflops_bf16"], []
    if "train" in args.what:
        mine = our_train_steps(8)
        rows.append(report("train step (batch 8)", mine["train_step"], args.steps, peak))
        torch._inductor.config.cpp.enable_kernel_profile = True      # each fused kernel a profiler event
        compiled = our_train_steps(8, compiled=True)
        compiled["train_step"]()                                     # compile outside the profile
        rows.append(report("compiled train step (batch 8)", compiled["train_step"], args.steps, peak))
        if mods:
            theirs = official_train_steps(mods, 8, mine["inputs"])
            rows.append(report("official bf16 train step", theirs["train_step bf16"], args.steps, peak))
    if "sample" in args.what:
        model, vq = build_sampler(torch.device("cpu"))
        for decode in (False, True):
            rows.append(report(f"sampling {'with' if decode else 'without'} decode (batch 16)",
                               sampler(model, vq, decode), args.steps, peak))
        if mods:
            rows.append(report("official bf16 sampling with decode", official_samplers(mods)[("bf16", True)],
                               args.steps, peak))
    print(markdown(rows), file=sys.stderr)
    print(json.dumps({"machine": mach, "official": note, "profiles": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
