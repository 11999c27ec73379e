"""Command-line flags generated from the config models, so a setting declared once in a pydantic class (its
type, default, bounds and description) is a flag of every command that takes it."""

from __future__ import annotations

import argparse
import enum
import typing
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel

from tasc_ray.engine.config import BLOCKS, EngineConfig
from tasc_ray.engine.generator import SamplingParams

# EngineConfig fields that are not engine flags: --model is added by add_model_argument (commands without an
# engine take it too), the batch size is each command's own (--batch-size), the blocks' fields come flat.
_NOT_ENGINE_FLAGS = {"model", "max_batch_size", *BLOCKS}


def add_config_arguments(
    parser: argparse.ArgumentParser, config: type[BaseModel], exclude: Collection[str] = ()
) -> None:
    """One `--field-name` flag per field of `config` (enum and Literal fields become choices)."""
    for name, field in config.model_fields.items():
        if name in exclude:
            continue
        kind = _scalar_type(field.annotation)
        kwargs: dict[str, Any] = {"default": field.default, "help": field.description or name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            kwargs.update(choices=[m.value for m in kind], default=field.default.value)
        elif isinstance(kind, tuple):
            kwargs["choices"] = list(kind)
        else:
            kwargs["type"] = kind
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def config_from_args(
    config: type[BaseModel], args: argparse.Namespace, exclude: Collection[str] = (), **extra: Any
) -> Any:
    """The `config` instance whose fields are the parsed flags of the same names (validated by pydantic)."""
    values = {name: getattr(args, name) for name in config.model_fields if name not in exclude and hasattr(args, name)}
    return config.model_validate({**values, **extra})


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    field = EngineConfig.model_fields["model"]
    parser.add_argument("--model", default=field.default, help=field.description)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags (--index, --dtype, --device), then each block's in its own group: the drafter's (--mode,
    --max-draft, ...), the scheduler's (--max-prefill-tokens, ...) and the experimental switches."""
    add_config_arguments(parser, EngineConfig, exclude=_NOT_ENGINE_FLAGS)
    for name, block in BLOCKS.items():
        group = parser.add_argument_group(name, block.__doc__)
        add_config_arguments(group, block)  # type: ignore[arg-type]  # a group takes the same add_argument


def engine_config(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    blocks = {name: config_from_args(block, args) for name, block in BLOCKS.items()}
    return config_from_args(EngineConfig, args, exclude=set(BLOCKS), **blocks, **extra)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace, speculative: bool = True) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=list(args.stop),
        speculative=speculative,
    )


def _scalar_type(annotation: Any) -> Any:
    """int/float/str/an Enum class for a field's annotation (Optional stripped); a tuple of values for a Literal."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        return _scalar_type(args[0])
    return annotation
