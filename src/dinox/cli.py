"""The one `dinox` command. Each subcommand lives in its own module, which provides
`add_parser(subparsers)` (registering its arguments and `func=run`) and `run(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys

from dinox import __version__
from dinox.errors import UserError

COMMANDS = [
    "dinox.commands.synth",
    "dinox.commands.prep",
    "dinox.commands.train",
    "dinox.commands.eval",
    "dinox.commands.monitor",
    "dinox.commands.inspect",
    "dinox.commands.demo",
    "dinox.commands.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinox",
        description="DINOv3-style self-supervised pretraining of Vision Transformers on CT.",
    )
    parser.add_argument("--version", action="version", version=f"dinox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
