"""EngineConfig and load_engine: the one way the CLI, Ray jobs and Serve replicas build a SpeculativeGenerator."""

from __future__ import annotations

import logging

from pydantic import BaseModel, Field

from tasc_ray.drafter import (
    DEFAULT_LAMBDA,
    DEFAULT_MAX_DRAFT,
    DEFAULT_MIN_PATH_PROB,
    Drafter,
    DrafterConfig,
    DraftMode,
)
from tasc_ray.generator import SpeculativeGenerator
from tasc_ray.models import DEFAULT_MODEL, load_model
from tasc_ray.ngram_index import NgramIndex

logger = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    """What a generator needs: the model, an optional index, and the drafter's knobs."""

    model: str = DEFAULT_MODEL
    index: str | None = Field(None, description="n-gram index directory or s3:// prefix")
    dtype: str = "float32"
    device: str | None = None
    mode: DraftMode = DraftMode.MIXED
    lam: float = Field(DEFAULT_LAMBDA, ge=0.0, le=1.0)
    max_draft: int = Field(DEFAULT_MAX_DRAFT, ge=0)
    min_path_prob: float = Field(DEFAULT_MIN_PATH_PROB, ge=0.0, le=1.0)
    max_batch_size: int = Field(8, ge=1)

    def drafter_config(self) -> DrafterConfig:
        return DrafterConfig(mode=self.mode, max_draft=self.max_draft, lam=self.lam, min_path_prob=self.min_path_prob)


def load_engine(config: EngineConfig, index: NgramIndex | None = None) -> SpeculativeGenerator:
    """Load the model (and the index, unless given) and build the generator; refuses a mismatched index."""
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    if index is None and config.index:
        index = NgramIndex.load(config.index)
    drafter_config = config.drafter_config()
    if index is None and drafter_config.mode != DraftMode.CONTEXT:
        logger.info("no index given: drafting from the prompt's own n-grams only (context mode)")
        drafter_config.mode = DraftMode.CONTEXT
    drafter = Drafter(index, drafter_config)
    return SpeculativeGenerator(model, tokenizer, drafter, max_batch_size=config.max_batch_size)
