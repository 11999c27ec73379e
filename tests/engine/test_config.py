"""The engine's settings: one block per concern nested in EngineConfig, a block's fields accepted at the top
level, bounds checked, removed settings refused."""

from __future__ import annotations

import pydantic
import pytest

from tasc_ray.engine.config import DrafterConfig, DraftMode, EngineConfig, ExperimentalConfig, SchedulerConfig


def test_flat_block_fields_are_nested():
    config = EngineConfig(index="idx/", mode="context", max_draft=3, max_prefill_tokens=512, fast_forward=False)
    assert config.drafter == DrafterConfig(mode=DraftMode.CONTEXT, max_draft=3)
    assert config.scheduler == SchedulerConfig(max_prefill_tokens=512)
    assert config.experimental == ExperimentalConfig(fast_forward=False)
    nested = EngineConfig.model_validate({"drafter": {"tree_nodes": 0}, "max_draft": 4})
    assert nested.drafter.tree_nodes == 0 and nested.drafter.max_draft == 4
    assert EngineConfig.model_validate(config.model_dump()) == config  # round trip through a dict


def test_bad_and_removed_settings_are_refused():
    with pytest.raises(pydantic.ValidationError, match="min_path_prob"):
        EngineConfig(min_path_prob=1.5)
    with pytest.raises(pydantic.ValidationError, match="unknown"):
        EngineConfig(unknown=1)
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        EngineConfig(dtype="int3")
    for removed in ("lam", "calibrate", "prompt_grounding", "scheduling"):
        with pytest.raises(pydantic.ValidationError, match=removed):
            EngineConfig(**{removed: 1})


def test_every_field_is_documented():
    for block in (EngineConfig, DrafterConfig, SchedulerConfig, ExperimentalConfig):
        for name, field in block.model_fields.items():
            assert field.description, (block.__name__, name)


def test_no_index_means_context_and_live_outputs():
    mixed = DrafterConfig()
    assert mixed.for_index(True) is mixed and mixed.for_index(False) is mixed  # the live overlay is the corpus
    offline = DrafterConfig(live_outputs=0)
    assert offline.for_index(False).mode == DraftMode.CONTEXT and offline.for_index(False).max_draft == 8
