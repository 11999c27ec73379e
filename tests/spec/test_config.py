"""The engine's settings: DrafterConfig nested in EngineConfig, flat drafter fields accepted, bounds checked."""

from __future__ import annotations

import pydantic
import pytest

from tasc_ray.spec.config import DrafterConfig, DraftMode, EngineConfig


def test_flat_drafter_fields_are_nested():
    config = EngineConfig(index="idx/", mode="context", max_draft=3)
    assert config.drafter == DrafterConfig(mode=DraftMode.CONTEXT, max_draft=3)
    nested = EngineConfig.model_validate({"drafter": {"lam": 0.2}, "max_draft": 4})
    assert nested.drafter.lam == 0.2 and nested.drafter.max_draft == 4
    assert EngineConfig.model_validate(config.model_dump()) == config  # round trip through a dict


def test_bad_settings_are_refused():
    with pytest.raises(pydantic.ValidationError, match="lam"):
        EngineConfig(lam=1.5)
    with pytest.raises(pydantic.ValidationError, match="unknown"):
        EngineConfig(unknown=1)
    with pytest.raises(pydantic.ValidationError, match="dtype"):
        EngineConfig(dtype="int3")


def test_no_index_means_context_and_live_outputs():
    mixed = DrafterConfig()
    assert mixed.for_index(True) is mixed and mixed.for_index(False) is mixed  # the live overlay is the corpus
    offline = DrafterConfig(live_outputs=0)
    assert offline.for_index(False).mode == DraftMode.CONTEXT and offline.for_index(False).lam == offline.lam
