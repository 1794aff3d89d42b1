"""`flexvar import-official`: convert released FlexVAR checkpoints into this project's format.

    flexvar import-official --tokenizer FlexVAE.pth --transformer FlexVARd16-epo179.pth --out models/official_d16
"""
from __future__ import annotations

import argparse

from flexvar.errors import about, one_line_parser_errors, usage


def _add_import_official(p: argparse.ArgumentParser) -> None:
    one_line_parser_errors(p)
    p.add_argument("--tokenizer", metavar="PATH", help="official tokenizer checkpoint (FlexVAE.pth, {'model': state_dict})")
    p.add_argument("--transformer", metavar="PATH",
                   help="official transformer checkpoint (FlexVARd16-epo179.pth; raw or {'trainer': {'var_wo_ddp': ...}})")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (tokenizer.pt is written there)")


def _run_import_official(args: argparse.Namespace) -> int:
    from flexvar.official import import_official_tokenizer, import_official_transformer
    from flexvar.outputs import check_in_file, check_out_dir

    if not args.tokenizer and not args.transformer:
        raise usage("--tokenizer", "nothing to import: give --tokenizer PATH and/or --transformer PATH")
    for arg, path in (("--tokenizer", args.tokenizer), ("--transformer", args.transformer)):
        if path:
            check_in_file(path, arg)
    check_out_dir(args.out, "--out", replaces=False)   # writes tokenizer.pt / flexvar.pt by name, deletes nothing
    if args.tokenizer:
        with about("--tokenizer"):
            print(f"wrote {import_official_tokenizer(args.tokenizer, args.out)}")
    if args.transformer:   # refers to the tokenizer in the same folder (imported now or before)
        with about("--transformer"):
            print(f"wrote {import_official_transformer(args.transformer, args.out, args.out)}")
    return 0


COMMANDS = {
    "import-official": ("convert official FlexVAR checkpoints (--tokenizer FlexVAE.pth) into this project's format",
                        _add_import_official, _run_import_official),
}
