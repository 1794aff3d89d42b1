"""DVC stage `prepare`: data.source -> data/prepared (train/val Arrow, stats.json, preview.png).

    python -m pipeline.prepare --params params.yaml --out data/prepared
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.common import stage_args

from flexvar.config import load_params
from flexvar.data.prepare import prepare
from flexvar.errors import command
from flexvar.outputs import check_out_dir, mark_ours
from flexvar.seeding import seed_everything
from pipeline.tracking import stage_run

PARAM_KEYS = ["seed", "data"]


@command("prepare")
def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, out={"default": "data/prepared", "help": "output folder"})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    check_out_dir(args.out)   # prepare() replaces the folder: only one this pipeline wrote
    seed_everything(params.seed)
    with stage_run("prepare", params, PARAM_KEYS) as log:
        stats = prepare(params.data, params.seed, args.out)
        mark_ours(args.out, "prepare")
        log.log_metrics({f"num_{split}": n for split, n in stats["totals"].items()} |
                        {"num_skipped": stats["num_skipped"], "num_resized_up": sum(stats["resized_up"].values())})
        for name in ("stats.json", "preview.png"):
            log.log_artifact(Path(args.out) / name)
    print(f"prepare: wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in stats["totals"].items())
          + f", skipped={stats['num_skipped']}, resized up={sum(stats['resized_up'].values())}"
          + f", hash={stats['content_hash'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
