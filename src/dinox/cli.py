"""The one `dinox` command. Each subcommand lives in its own module, which provides
`add_parser(subparsers)` (registering its arguments and `func=run`) and `run(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys

from dinox import __version__
from dinox.errors import UserError
from dinox.run.logging import rank_prefix
from dinox.run.signals import EXIT_SIGINT

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


class DinoxArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: the message and where the flags are listed, instead of
    the whole usage block (train's runs to ~55 lines and buries the line that matters). It
    exits 1, dinox's code for bad input, not argparse's 2, which the eval commands use for a
    failed check. Subcommands' parsers are of this class too (argparse builds them with the
    parent's type)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(1, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser under `parser` that has no subcommands of its own."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def build_parser() -> argparse.ArgumentParser:
    parser = DinoxArgumentParser(
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
    for leaf in _leaf_parsers(parser):
        leaf.set_defaults(_parser=leaf)
    return parser


def _os_error_line(exc: OSError) -> str:
    """One line for a file-system failure (read-only disk, no permission, a file where a
    folder is needed, disk full), naming the path and what to do."""
    where = f" {exc.filename}" if exc.filename else ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return (f"cannot read or write{where}: {reason}; check that the path exists, is the kind "
            "expected (file or folder) and is writable, or give another one")


def main(argv: list[str] | None = None) -> int:
    try:   # Ctrl-C while the subcommands (and torch) are still being imported, too
        return _run(argv)
    except KeyboardInterrupt as exc:
        # a command that knows what the interruption left (prep) says so in the exception;
        # SIGTERM, where a command turns it into an exception (signals.Terminated), exits 143
        try:
            print(rank_prefix() + (str(exc) or "interrupted"), file=sys.stderr)
        except OSError:   # the terminal is gone (SIGHUP): the exit code still tells
            pass
        return getattr(exc, "exit_code", EXIT_SIGINT)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # report unknown flags with the usage of the subcommand they were given to, not the
            # top-level one (what argparse does, and what the seed scripts' shims showed)
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # a refused flag (1), --help or --version (0): a code, as for any other end
        return exc.code if isinstance(exc.code, int) else 1
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"{rank_prefix()}error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"{rank_prefix()}error: {_os_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
