"""``python -m data_prep <command> ...``: dataset adapters, the demo data and preprocessing.

Adapters (see :mod:`data_prep.adapters`)::

    python -m data_prep <adapter> --root DIR --out DIR [--seed 0] [--val-frac F] [--test-frac F] [options]

``demo``, ``preprocess`` and ``check`` forward all further arguments to ``data_prep.demo.main(argv)``,
``data_prep.preprocess.main(argv)`` and ``data_prep.check.main(argv)`` (imported only when used).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from data_prep.adapters import ADAPTERS
from transforms.errors import InputDataError

__all__ = ["build_parser", "main"]

#: subcommands forwarded to another module's ``main(argv)``
FORWARDED = {
    "demo": ("data_prep.demo", "create the synthetic demo data (see python -m data_prep demo --help)"),
    "preprocess": ("data_prep.preprocess", "preprocess volumes (see python -m data_prep preprocess --help)"),
    "check": (
        "data_prep.check",
        "check every item of a datalist, list all faults (see python -m data_prep check --help)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m data_prep`` parser with one subcommand per adapter (plus the forwarded ones)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Write MONAI datalist JSON files from datasets on disk (splits by subject, fixed seed).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for a in ADAPTERS.values():
        p = sub.add_parser(
            a.name,
            help=a.help,
            description=a.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        a.configure(p)
    for name, (_, text) in FORWARDED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand.

    Args:
        argv: the arguments after ``python -m data_prep`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success; the forwarded ``main``'s status for ``demo``/``preprocess``.
        Input-data errors end the program with status 2 and a one-line message naming the file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        name = FORWARDED[argv[0]][0]
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            print(
                f"python -m data_prep {argv[0]}: {name} is not available in this installation",
                file=sys.stderr,
            )
            return 2
        status = module.main(argv[1:])
        return int(status or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ADAPTERS[args.command].run(args)
    except (InputDataError, ValueError) as e:
        parser.exit(2, f"python -m data_prep {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
