"""Run by tests/test_data_parallel_stage.py, alone or under torchrun: 2 steps of the library training loop on a
tiny FlexVAR with class dropout 0.5, recording per step the labels each forward received (before dropout)
and which of them the model replaced by the null class (its dropout mask). Writes OUT/rank<r>.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dp_masks_worker.py OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexvar import distributed  # noqa: E402
from flexvar.config import ScheduleConfig, TrainTransformerConfig, TransformerConfig  # noqa: E402
from flexvar.data.latent_cache import LatentSplit  # noqa: E402
from flexvar.seeding import seed_everything  # noqa: E402
from flexvar.tokenizer.quantizer import MultiScaleQuantizer  # noqa: E402
from flexvar.transformer.model import FlexVAR  # noqa: E402
from flexvar.transformer.training import train_transformer  # noqa: E402

N = 64   # images, each its own class, so a label names the image


def main(out: Path) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    device = distributed.init_from_env(torch.device("cpu"))
    rank, _ = distributed.rank_world()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 8, 8, 8, generator=g)
    data = LatentSplit(torch.stack([z, z.flip(-1)], 1), torch.arange(N), [str(i) for i in range(N)])
    model = FlexVAR(TransformerConfig(depth=1, width=32, heads=2, drop_path_rate=0.0, class_dropout=0.5),
                    64, 8, N, pe_size=8)
    seen: list[dict] = []
    model.register_forward_pre_hook(lambda m, args: seen.append({"labels": args[0].tolist()}) if m.training else None)
    model.class_emb.register_forward_pre_hook(
        lambda m, args: seen[-1].update(dropped=(args[0][:len(seen[-1]["labels"])] == N).tolist())
        if model.training else None)
    cfg = TrainTransformerConfig(steps=2, batch_size=16, micro_batch=8, warmup_steps=1, log_every=1, eval_every=2,
                                 checkpoint_every=2, val_batches=1, precision="fp32")
    train_transformer(model, MultiScaleQuantizer(64, 8), data, data, cfg, ScheduleConfig(), prediction="gt",
                      seed=0, device=device, out_dir=out / f"state{rank}")
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
