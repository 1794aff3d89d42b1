"""Generate the conformance references by running the OFFICIAL FlexVAR code (never this project's).

    FLEXVAR_OFFICIAL_DIR=/path/to/FlexVAR [LLAMAGEN_OFFICIAL_DIR=/path/to/LlamaGen] \
        python tests/conformance/make_references.py

Needs: torch, huggingface_hub (imported by the official models/flexvar.py); nothing else of the
official requirements (no flash-attn / xformers: the official code falls back to torch SDPA; no
CUDA: the official `dist` module falls back to the CPU). Runs on the CPU in under a minute.

It builds small random-initialised models with fixed seeds in the official layout:
- tokenizer: the official `models/vq_llama.py` VQModel (LlamaGen VQ layout, GroupNorm 32 groups) at
  a narrow base width (ch 32, ch_mult [1, 2], one res block, z 32, Cvae 32, 128 codes) — widths 32
  and 64, where a per-width group rule would differ from LlamaGen's 32 groups;
- transformer: the official `models/flexvar.py` FlexVAR, depth 2, width 64, 2 heads, l2-norm
  attention, 10 classes, every weight perturbed by seeded noise so no block is a no-op;
and writes, under tests/conformance/data/:
- official_tokenizer.pth   {'model': state_dict} as in FlexVAE.pth (with the codebook_used buffer)
- official_transformer.pth the raw FlexVAR state dict (as the released FlexVARd*.pth)
- references.pt            the official outputs (see REFERENCE KEYS below)

Only the public functions of the official code are called; the teacher-forcing encoder is the
method VARTrainer.encode_var_wo_firstL of trainer.py (the module imports the training stack and
`tap`), so that method alone is taken from the file's syntax tree and executed. The loss is
trainer.py's: cross-entropy with label smoothing 0.0 (utils/arg_util.py `ls`), per-token weight
1/L summed, mean over the batch = the plain mean. Per-step sampling calls are recorded by wrapping the official sampler.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "data"
CH, CH_MULT, N_RES, Z, CVAE, V = 32, [1, 2], 1, 32, 32, 128        # narrow official-layout tokenizer
DEPTH, WIDTH, HEADS, NUM_CLASSES = 2, 64, 2, 10                     # narrow official FlexVAR
TRAIN_SIDE = 16                                                     # max_pn of the official sampler
ENC_SCALES = [1, 2, 3, 5, 8, 16]                                    # tokenizer: indices + decode here
TF_SCHEDULES = {"canonical": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], "drawn": [1, 2, 4, 7, 11, 16]}
GEN_SCHEDULES = {"s3": [1, 2, 4], "s9": [1, 2, 3, 4, 5, 7, 10, 13, 16],
                 "s10_large": [1, 2, 3, 4, 6, 9, 13, 18, 26, 34]}   # 18..34 above the trained 16; 34 > the 32x32 position map
GEN_CLASSES = [0, 3, 7, 9]
CFG = 1.5


def official_dir(var: str) -> Path:
    path = os.environ.get(var)
    if not path or not Path(path).is_dir():
        sys.exit(f"make_references: set {var} to a clone of the official repository")
    return Path(path)


def method_from_file(path: Path, cls: str, name: str, namespace: dict):
    """Execute one method definition of an official class as a plain function (the module imports
    the whole training stack, `tap` included, which this script does not need)."""
    tree = ast.parse(path.read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float, gen: torch.Generator) -> None:
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))


def build_tokenizer(vq_llama):
    """Official VQModel; the narrow encoder/decoder are the official Encoder/Decoder classes at base
    width CH (ModelArgs has no width field: VQ-16 is hard-wired to 128)."""
    torch.manual_seed(0)
    vae = vq_llama.VQModel(vq_llama.ModelArgs(codebook_size=V, codebook_embed_dim=CVAE, encoder_ch_mult=CH_MULT,
                                              decoder_ch_mult=CH_MULT, z_channels=Z))
    vae.encoder = vq_llama.Encoder(ch=CH, ch_mult=CH_MULT, num_res_blocks=N_RES, z_channels=Z)
    vae.decoder = vq_llama.Decoder(ch=CH, ch_mult=CH_MULT, num_res_blocks=N_RES, z_channels=Z)
    vae.quant_conv = torch.nn.Conv2d(Z, CVAE, 1)
    vae.post_quant_conv = torch.nn.Conv2d(CVAE, Z, 1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():                       # non-trivial norm affines
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return vae.eval()


def build_transformer(flexvar_mod, vae):
    torch.manual_seed(2)
    var = flexvar_mod.FlexVAR(vae_local=vae, num_classes=NUM_CLASSES, depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS,
                              mlp_ratio=4.0, drop_path_rate=0.0, cond_drop_rate=0.0, attn_l2_norm=True,
                              flash_if_available=False, fused_if_available=False)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=-1)
    perturb(var, 0.05, torch.Generator().manual_seed(3))
    return var.eval()


def main() -> None:
    flex = official_dir("FLEXVAR_OFFICIAL_DIR")
    sys.path.insert(0, str(flex))
    import models.flexvar as flexvar_mod      # official
    import models.vq_llama as vq_llama        # official (FlexVAE = LlamaGen VQ layout)

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    vae = build_tokenizer(vq_llama)
    var = build_transformer(flexvar_mod, vae)
    pos_init = var.generate_2d_rotary_position_embedding(h=8, w=6, d=16)   # the official initial position map
    refs: dict = {"pos_init_8x6_d16": pos_init, "config": dict(ch=CH, ch_mult=CH_MULT, num_res_blocks=N_RES, z_channels=Z, codebook_dim=CVAE,
                                 codebook_size=V, depth=DEPTH, width=WIDTH, heads=HEADS, num_classes=NUM_CLASSES,
                                 train_side=TRAIN_SIDE, cfg=CFG, classes=GEN_CLASSES)}

    # ---------------------------------------------------------------- tokenizer
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 2 * TRAIN_SIDE, 2 * TRAIN_SIDE, generator=gen) * 2 - 1     # downsample 2 -> 16x16 latent
    with torch.no_grad():
        refs["image"] = x
        refs["encoder_out"] = vae.encoder(x)
        h = vae.encode_conti(x)
        refs["latent"] = h
        for s in ENC_SCALES:
            quant, _, info = vae.quantize(F.interpolate(h, size=(s, s), mode="area"))   # as train.py encodes
            idx = info[-1].view(x.shape[0], s, s)
            refs[f"indices_{s}"] = idx
            refs[f"decode_{s}"] = vae.decode_code(idx.flatten(), shape=[x.shape[0], CVAE, s, s])

    # ---------------------------------------------------------------- teacher forcing, logits, gradients
    encode = method_from_file(flex / "trainer.py", "VARTrainer", "encode_var_wo_firstL", {"F": F, "torch": torch})
    trainer = SimpleNamespace(vae_local=vae)      # the only attribute the method reads
    label = torch.tensor([1, 8])
    for name, pn in TF_SCHEDULES.items():
        with torch.no_grad():
            quant_z, gt = encode(trainer, x, pn)
        refs[f"tf_{name}_scales"], refs[f"tf_{name}_input"], refs[f"tf_{name}_target"] = pn, quant_z, gt
        var.zero_grad()
        logits = var(label, quant_z, pn)
        loss = F.cross_entropy(logits.reshape(-1, V), gt.view(-1), label_smoothing=0.0)   # official ls 0.0
        loss.backward()
        refs[f"tf_{name}_logits"] = logits.detach()
        refs[f"tf_{name}_loss"] = loss.detach()
        if name == "drawn":   # gradients of one schedule keep the data small
            refs[f"tf_{name}_grads"] = {k: p.grad.detach().clone() for k, p in var.named_parameters()
                                        if p.grad is not None}
    refs["tf_label"] = label
    var.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------- generation
    calls: list[tuple[int, torch.Tensor]] = []
    official_sampler = flexvar_mod.sample_with_top_k_top_p_

    def recording_sampler(logits_BlV, rng=None, top_k=0, top_p=0.0, num_samples=1):
        out = official_sampler(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=num_samples)
        calls.append((top_k, out[:, :, 0].clone()))
        return out

    flexvar_mod.sample_with_top_k_top_p_ = recording_sampler
    labels = torch.tensor(GEN_CLASSES)
    for name, sched in GEN_SCHEDULES.items():
        calls.clear()       # greedy: top-k 1 everywhere, cfg with the official ramp
        with torch.no_grad():
            img = var.autoregressive_infer_cfg(vqvae=vae, B=len(labels), label_B=labels, infer_patch_nums=sched,
                                               g_seed=0, cfg=CFG, top_k=1, top_p=0.0, max_pn=TRAIN_SIDE)
        refs[f"gen_{name}_scales"] = sched
        refs[f"gen_{name}_tokens"] = [t.view(len(labels), s, s) for (_, t), s in zip(calls, sched)]
        refs[f"gen_{name}_images"] = img
        calls.clear()       # the official greedy rule: which steps does it sample with top-k 1 when asked for top-k 50?
        with torch.no_grad():
            var.autoregressive_infer_cfg(vqvae=vae, B=len(labels), label_B=labels, infer_patch_nums=sched,
                                         g_seed=0, cfg=CFG, top_k=50, top_p=0.95, max_pn=TRAIN_SIDE)
        refs[f"gen_{name}_greedy_steps"] = [k == 1 for k, _ in calls]
    flexvar_mod.sample_with_top_k_top_p_ = official_sampler

    # ---------------------------------------------------------------- LlamaGen cross-check (optional)
    llama = os.environ.get("LLAMAGEN_OFFICIAL_DIR")
    if llama:
        spec = importlib.util.spec_from_file_location(
            "llamagen_vq_model", Path(llama) / "tokenizer" / "tokenizer_image" / "vq_model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        enc = mod.Encoder(ch=CH, ch_mult=CH_MULT, num_res_blocks=N_RES, z_channels=Z)
        enc.load_state_dict(vae.encoder.state_dict())
        with torch.no_grad():
            diff = (enc.eval()(x) - refs["encoder_out"]).abs().max().item()
        print(f"LlamaGen encoder vs FlexVAR's vq_llama encoder: max abs diff {diff:.2e}")
        assert diff < 1e-5, "LlamaGen and FlexVAR's copy of its VQ model disagree"

    OUT.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.detach().clone() for k, v in vae.state_dict().items()}}, OUT / "official_tokenizer.pth")
    torch.save({k: v.detach().clone() for k, v in var.state_dict().items()   # the 680x680 training mask is
                if k != "attn_bias_for_masking"}, OUT / "official_transformer.pth")   # not a weight (eval_c2i.py replaces it)
    torch.save(refs, OUT / "references.pt")
    for f in sorted(OUT.iterdir()):
        print(f"wrote {f} ({f.stat().st_size / 1e6:.2f} MB)")
    for name in GEN_SCHEDULES:
        print(name, "official greedy steps:", refs[f"gen_{name}_greedy_steps"])


if __name__ == "__main__":
    main()
