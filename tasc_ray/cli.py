"""The `tasc-ray` command line (also `python -m tasc_ray`): one subcommand per feature, each with --help.

Feature modules register their own subcommands through a `register(subparsers)` function listed in
COMMAND_MODULES; every handler returns a dict summary, printed as JSON with --json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from tasc_ray.corpus import CorpusError
from tasc_ray.models import DEFAULT_MODEL, ModelNotFoundError
from tasc_ray.ngram_index import NgramIndexError

logger = logging.getLogger("tasc_ray")

COMMAND_MODULES = [
    "tasc_ray.commands",
    "tasc_ray.demo",
    "tasc_ray.bench",
    "tasc_ray.label_commands",
    "tasc_ray.ft_commands",
    "tasc_ray.index_commands",
]

# Errors that are the user's input, reported as one line and exit code 2 (tracebacks only with --verbose).
USER_ERRORS: tuple[type[BaseException], ...] = (
    CorpusError, ModelNotFoundError, NgramIndexError, FileNotFoundError, ValueError, KeyError,
)

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def add_command(subparsers: argparse._SubParsersAction, name: str, handler: Handler, help: str,
                description: str | None = None, json_flag: bool = True) -> argparse.ArgumentParser:
    """Add a subcommand whose handler returns a summary dict (printed as JSON with --json)."""
    parser = subparsers.add_parser(name, help=help, description=description or help,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.set_defaults(handler=handler)
    return parser


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{DEFAULT_MODEL!r} (embedded SmolLM2-135M-Instruct) or a Hugging Face model directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasc-ray",
        description="TASC: task-adaptive speculative decoding and vocabulary compression for small LMs, on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        summary = args.handler(args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tasc-ray {args.command}: error: {message}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, default=str))
    return 0
