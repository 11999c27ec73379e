"""tasc_ray: Task-Adaptive Sequence Compression (TASC) for small language models, distributed on Ray.

The engine (`NgramIndex`, `Drafter`, `SpeculativeGenerator`) is shared by the CLI, the Ray jobs and Serve.
Names are imported lazily, so that Ray workers that only unpickle a tasc_ray class do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Drafter": "tasc_ray.engine.drafts.drafter",
    "DrafterConfig": "tasc_ray.engine.config",
    "DraftMode": "tasc_ray.engine.config",
    "GenerationResult": "tasc_ray.engine.generator",
    "SamplingParams": "tasc_ray.engine.generator",
    "SpeculativeGenerator": "tasc_ray.engine.generator",
    "NgramCounts": "tasc_ray.engine.drafts.index",
    "NgramIndex": "tasc_ray.engine.drafts.index",
    "NgramIndexError": "tasc_ray.engine.drafts.index",
    "EngineConfig": "tasc_ray.engine.config",
    "load_engine": "tasc_ray.engine.load",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tasc_ray' has no attribute {name!r}")
