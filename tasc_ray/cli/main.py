"""The `tasc-ray` command line (also `python -m tasc_ray`): one subcommand per feature, each with --help.

Feature modules register their own subcommands through a `register(subparsers)` function listed in
COMMAND_MODULES; every handler returns a dict summary, printed as JSON with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from tasc_ray.engine.drafts.index import NgramIndexError
from tasc_ray.io import CorpusError, StorageError
from tasc_ray.models import ModelNotFoundError

COMMAND_MODULES = [
    "tasc_ray.cli.generate",
    "tasc_ray.cli.demo",
    "tasc_ray.cli.label",
    "tasc_ray.cli.ft",
    "tasc_ray.cli.pipeline",
    "tasc_ray.cli.index",
    "tasc_ray.cli.overlay",
]

# Errors that are the user's input, reported as one line and exit code 2 (tracebacks only with --verbose).
USER_ERRORS: tuple[type[BaseException], ...] = (
    CorpusError,
    StorageError,  # a location that cannot be read or written: missing bucket or key, access denied, parent a file
    ModelNotFoundError,
    NgramIndexError,
    FileNotFoundError,
    ValueError,
    KeyError,
)


class CommandIncomplete(Exception):
    """A command that ran but did not finish its work (e.g. rows left unlabeled): its summary is still printed
    with --json, and the exit code is 1."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


Handler = Callable[[argparse.Namespace], dict[str, Any]]


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    handler: Handler,
    help: str,
    description: str | None = None,
    json_flag: bool = True,
) -> argparse.ArgumentParser:
    """Add a subcommand whose handler returns a summary dict (printed as JSON with --json)."""
    parser = subparsers.add_parser(
        name, help=help, description=description or help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.set_defaults(handler=handler)
    return parser


def build_parser(
    prog: str = "tasc-ray",
    modules: list[str] = COMMAND_MODULES,
    description: str = "TASC: task-adaptive speculative decoding and vocabulary compression for small LMs, on Ray.",
) -> argparse.ArgumentParser:
    """A parser whose subcommands are registered by `modules` (each has a `register(subparsers)`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in modules:
        importlib.import_module(module).register(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, run the chosen handler, print its summary with --json; user errors are one line and exit 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code = 0
    as_json = getattr(args, "json", False)
    # With --json, stdout carries the JSON summary alone: anything else printed meanwhile (Ray's own warnings
    # from its background threads included) goes to stderr.
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            summary = args.handler(args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except CommandIncomplete as exc:
        print(f"{parser.prog} {args.command}: incomplete: {exc}", file=sys.stderr)
        summary, code = exc.summary, 1
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    return code


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)
