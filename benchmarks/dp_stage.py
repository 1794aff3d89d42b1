"""Run a training stage data-parallel under torchrun, without Ray (benchmarks only):

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/dp_stage.py \
        pipeline.train_tokenizer --params params.yaml ...

Each process joins the gloo group torchrun describes and runs the stage's main() with rank 0's
outputs unchanged and other ranks' outputs in scratch folders (flows.ray_train.rank_argv), which
is what a Ray Train worker does; benchmarks/scale_memory.py --dp torchrun uses it where Ray cannot start.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from flows.ray_train import rank_argv  # noqa: E402


def main() -> int:
    module, argv = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    try:
        return importlib.import_module(module).main(rank_argv(module, argv, dist.get_rank()))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
