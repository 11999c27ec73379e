"""CLI flags generated from the config models: every DrafterConfig field is a flag, parsed back into the config."""

from __future__ import annotations

import argparse

import pytest

from tasc_ray.cli.args import add_engine_arguments, add_model_argument, engine_config
from tasc_ray.engine.config import DrafterConfig, DraftMode, EngineConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_model_argument(parser)
    add_engine_arguments(parser)
    return parser


def test_every_drafter_setting_is_a_flag_with_the_config_default():
    args = _parser().parse_args([])
    assert engine_config(args) == EngineConfig()
    flags = {a.dest for a in _parser()._actions}
    assert set(DrafterConfig.model_fields) <= flags
    assert {"index", "dtype", "device", "model"} <= flags


def test_flags_parse_into_the_nested_config():
    args = _parser().parse_args(
        [
            "--index",
            "idx/",
            "--mode",
            "corpus",
            "--max-draft",
            "3",
            "--tree-nodes",
            "6",
            "--max-prefill-tokens",
            "300",
            "--no-fast-forward",
            "--dtype",
            "bfloat16",
        ]
    )
    config = engine_config(args, max_batch_size=4)
    assert config.index == "idx/" and config.dtype == "bfloat16" and config.max_batch_size == 4
    assert config.drafter == DrafterConfig(mode=DraftMode.CORPUS, max_draft=3, tree_nodes=6)
    assert config.scheduler.max_prefill_tokens == 300 and config.experimental.fast_forward is False


def test_choices_come_from_the_types():
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mode", "telepathy"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--dtype", "int3"])
