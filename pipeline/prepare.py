"""DVC stage `prepare`: data.source -> data/prepared (train/val Arrow, stats.json, preview.png).

    python -m pipeline.prepare --params params.yaml --out data/prepared
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.common import set_offline_env, stage_args

set_offline_env()

from flexvar.config import ConfigError, load_params  # noqa: E402
from flexvar.data.prepare import DataError, prepare  # noqa: E402
from flexvar.seeding import seed_everything  # noqa: E402
from pipeline.tracking import TrackingError, stage_run  # noqa: E402

PARAM_KEYS = ["seed", "data"]


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, out={"default": "data/prepared", "help": "output folder"})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        seed_everything(params.seed)
        with stage_run("prepare", params, PARAM_KEYS) as log:
            stats = prepare(params.data, params.seed, args.out)
            log.log_metrics({f"num_{split}": n for split, n in stats["totals"].items()} |
                            {"num_skipped": stats["num_skipped"]})
            for name in ("stats.json", "preview.png"):
                log.log_artifact(Path(args.out) / name)
    except (ConfigError, DataError, TrackingError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"prepare: wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in stats["totals"].items())
          + f", skipped={stats['num_skipped']}, hash={stats['content_hash'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
