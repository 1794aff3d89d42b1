"""Print the conformance table (this project vs the official code's committed outputs) and write
docs/conformance_greedy.png: for each schedule, the official greedy images (top row) above ours.

    PYTHONPATH=. python tests/conformance/compare.py [--png docs/conformance_greedy.png]

Reads only tests/conformance/data (made by make_references.py); imports no official code.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flexvar.cli import main as cli                                   # noqa: E402
from flexvar.data.splits import to_uint8                              # noqa: E402
from flexvar.config import SamplingSettings                            # noqa: E402
from flexvar.generation.generate import generate                      # noqa: E402
from flexvar.generation.sampling import greedy_step                   # noqa: E402
from flexvar.grid import image_grid                                   # noqa: E402
from flexvar.official import TRANSFORMER_RENAMES                      # noqa: E402
from flexvar.tokenizer.vqvae import load_tokenizer                    # noqa: E402
from flexvar.transformer.checkpoint import load_flexvar               # noqa: E402
from flexvar.transformer.teacher_forcing import gt_inputs_targets     # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def row(item: str, value: str) -> None:
    print(f"| {item} | {value} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--png", default="docs/conformance_greedy.png")
    args = ap.parse_args()
    refs = torch.load(DATA / "references.pt", weights_only=True)
    cfg = refs["config"]
    out = Path(tempfile.mkdtemp())
    cli(["import-official", "--tokenizer", str(DATA / "official_tokenizer.pth"),
         "--transformer", str(DATA / "official_transformer.pth"), "--out", str(out)])
    vq, (model, meta) = load_tokenizer(out), load_flexvar(out)
    model.eval()
    print("| item | this project vs official |\n| --- | --- |")
    x = refs["image"]
    with torch.no_grad():
        row("VQ encoder output", f"max abs diff {(vq.encoder(x) - refs['encoder_out']).abs().max():.2e}")
        z = vq.encode(x)
        row("latent (after quant_conv)", f"max abs diff {(z - refs['latent']).abs().max():.2e}")
        for s in (1, 2, 3, 5, 8, 16):
            idx, _ = vq.quantize_at(z, (s, s))
            agree = (idx == refs[f"indices_{s}"]).float().mean() * 100
            dec = (vq.decode_indices(idx) - refs[f"decode_{s}"]).abs().max()
            row(f"indices / decode at {s}x{s}", f"{agree:.1f}% equal / max abs diff {dec:.2e}")
    names = {"tf_" + k[3:-len("_scales")] for k in refs if k.startswith("tf_") and k.endswith("_scales")}
    for tf in sorted(names):
        scales = [(s, s) for s in refs[f"{tf}_scales"]]
        with torch.no_grad():
            inp, tgt = gt_inputs_targets(vq.quantize, z, scales)
        row(f"teacher-forcing inputs {refs[f'{tf}_scales']}", f"max abs diff {(inp - refs[f'{tf}_input']).abs().max():.2e}")
        row(f"teacher-forcing targets {refs[f'{tf}_scales']}", f"{(tgt == refs[f'{tf}_target']).float().mean() * 100:.1f}% equal")
        model.zero_grad(set_to_none=True)
        logits = model(refs["tf_label"], refs[f"{tf}_input"], scales)
        row(f"logits {refs[f'{tf}_scales']}", f"max abs diff {(logits - refs[f'{tf}_logits']).abs().max():.2e}")
        loss = F.cross_entropy(logits.reshape(-1, cfg["codebook_size"]), refs[f"{tf}_target"].view(-1))
        row(f"loss {refs[f'{tf}_scales']}", f"{loss.item():.6f} vs {refs[f'{tf}_loss'].item():.6f}")
        if f"{tf}_grads" in refs:
            loss.backward()
            ours = dict(model.named_parameters())
            worst = max(((ours[_ours(k)].grad - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                        for k, g in refs[f"{tf}_grads"].items())
            row(f"gradients {refs[f'{tf}_scales']} ({len(refs[f'{tf}_grads'])} tensors)",
                f"max abs diff / tensor max: {worst:.2e}")
    tiles = []
    for name in [k[4:-7] for k in refs if k.startswith("gen_") and k.endswith("_scales")]:
        sched = refs[f"gen_{name}_scales"]
        rule = [greedy_step((s, s), cfg["train_side"], "official") for s in sched]
        row(f"greedy rule {sched}", "same steps" if rule == refs[f"gen_{name}_greedy_steps"] else "DIFFERENT")
        g = generate(model, vq, torch.tensor(cfg["classes"]), [(s, s) for s in sched],
                     SamplingSettings(guidance=cfg["cfg"], top_k=1, greedy_rule="official", precision="fp32"),
                     batch_size=4, seed=0, train_side=max(meta["latent_hw"]))
        tok = sum(int(torch.equal(a, b)) for a, b in zip(g.tokens, refs[f"gen_{name}_tokens"]))
        ref_u8, our_u8 = to_uint8(refs[f"gen_{name}_images"].clamp(-1, 1)), to_uint8(g.images)
        px = (ref_u8.int() - our_u8.int()).abs().max().item()
        row(f"greedy generation {sched}, classes {cfg['classes']}",
            f"tokens equal at {tok}/{len(sched)} steps; images max pixel diff {px}")
        size = 4 * 34   # the largest schedule's image side (2 * 34 px) doubled for viewing
        tiles += [F.interpolate(t.float(), size=(size, size), mode="nearest").to(torch.uint8) for t in (ref_u8, our_u8)]
    png = Path(args.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    image_grid(torch.cat(tiles), ncol=4).save(png)
    print(f"wrote {png}: rows = official / ours for each schedule, 4 classes each")
    return 0


def _ours(key: str) -> str:
    for pattern, repl in TRANSFORMER_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


if __name__ == "__main__":
    sys.exit(main())
