"""`flexvar import-official`: convert released FlexVAR checkpoints into this project's format.

    flexvar import-official --tokenizer FlexVAE.pth --transformer FlexVARd16-epo179.pth --out models/official_d16
"""
from __future__ import annotations

import argparse


def _add_import_official(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", metavar="PATH", help="official tokenizer checkpoint (FlexVAE.pth, {'model': state_dict})")
    p.add_argument("--transformer", metavar="PATH",
                   help="official transformer checkpoint (FlexVARd16-epo179.pth; raw or {'trainer': {'var_wo_ddp': ...}})")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (tokenizer.pt is written there)")


def _run_import_official(args: argparse.Namespace) -> int:
    from flexvar.checkpoint import CheckpointError
    from flexvar.errors import UsageError
    from flexvar.official import import_official_tokenizer

    from flexvar.official import import_official_transformer

    if not args.tokenizer and not args.transformer:
        raise UsageError("nothing to import: give --tokenizer PATH and/or --transformer PATH")
    try:
        if args.tokenizer:
            print(f"wrote {import_official_tokenizer(args.tokenizer, args.out)}")
        if args.transformer:   # refers to the tokenizer in the same folder (imported now or before)
            print(f"wrote {import_official_transformer(args.transformer, args.out, args.out)}")
    except CheckpointError as e:
        raise UsageError(str(e)) from e
    return 0


COMMANDS = {
    "import-official": ("convert official FlexVAR checkpoints (--tokenizer FlexVAE.pth) into this project's format",
                        _add_import_official, _run_import_official),
}
