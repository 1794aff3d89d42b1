"""DVC stage `prepare`: data.source -> data/prepared (train/val Arrow + stats.json).

    python -m pipeline.prepare --params params.yaml --out data/prepared
"""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline import env

env.setup()

from flexvar.config import ConfigError, load_params  # noqa: E402
from flexvar.prepare import DataError, prepare  # noqa: E402
from flexvar.seeding import seed_everything  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--out", default="data/prepared", help="output folder (default: data/prepared)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        seed_everything(params.seed)
        stats = prepare(params.data, params.seed, args.out)
    except (ConfigError, DataError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"prepare: wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in stats["totals"].items())
          + f", skipped={stats['num_skipped']}, hash={stats['content_hash'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
