"""tasc_ray: Task-Adaptive Sequence Compression (TASC) for small language models, distributed on Ray.

The engine (`NgramIndex`, `Drafter`, `SpeculativeGenerator`) is shared by the CLI, the Ray jobs and Serve.
"""

from tasc_ray.drafter import Drafter, DrafterConfig, DraftMode
from tasc_ray.generator import GenerationResult, SamplingParams, SpeculativeGenerator
from tasc_ray.ngram_index import NgramCounts, NgramIndex, NgramIndexError

__all__ = [
    "Drafter", "DrafterConfig", "DraftMode", "GenerationResult", "NgramCounts", "NgramIndex", "NgramIndexError",
    "SamplingParams", "SpeculativeGenerator",
]
__version__ = "0.1.0"
