"""tasc_ray: Task-Adaptive Sequence Compression (TASC) for small language models, distributed on Ray.

The engine (`NgramIndex`, `Drafter`, `SpeculativeGenerator`) is shared by the CLI, the Ray jobs and Serve.
Names are imported lazily, so that Ray workers that only unpickle a tasc_ray class do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Drafter": "tasc_ray.drafter", "DrafterConfig": "tasc_ray.drafter", "DraftMode": "tasc_ray.drafter",
    "GenerationResult": "tasc_ray.generator", "SamplingParams": "tasc_ray.generator",
    "SpeculativeGenerator": "tasc_ray.generator",
    "NgramCounts": "tasc_ray.ngram_index", "NgramIndex": "tasc_ray.ngram_index",
    "NgramIndexError": "tasc_ray.ngram_index",
    "EngineConfig": "tasc_ray.engine", "load_engine": "tasc_ray.engine",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tasc_ray' has no attribute {name!r}")
