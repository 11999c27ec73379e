"""load_engine: the one way the CLI, the Ray stages and the Serve replicas build a SpeculativeGenerator from an
EngineConfig: the model, its index, the drafter, the forward, and the start-up timing of passes."""

from __future__ import annotations

import logging
import time

from tasc_ray.engine.config import EngineConfig
from tasc_ray.engine.drafts.drafter import build_drafter
from tasc_ray.engine.drafts.index import NgramIndex
from tasc_ray.engine.generator import SpeculativeGenerator
from tasc_ray.engine.model.fast_forward import build_fast_forward
from tasc_ray.engine.model.packed_linear import pack_linear_layers
from tasc_ray.models import load_model

__all__ = ["EngineConfig", "load_engine"]

logger = logging.getLogger(__name__)


def load_engine(config: EngineConfig, index: NgramIndex | None = None) -> SpeculativeGenerator:
    """Load the model (and the index, unless given) and build the generator; refuses a mismatched index."""
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    if config.precision != "fp32" and not config.experimental.fast_forward:
        raise ValueError(f"precision {config.precision!r} runs on the fast forward; it was switched off")
    fast = build_fast_forward(model, config.precision) if config.experimental.fast_forward else None
    if fast is None and config.precision != "fp32":
        raise ValueError(f"precision {config.precision!r} needs the fast forward, which does not apply to this model")
    if fast is None:  # the model's own forward runs: on packed layers (a no-op off a float32 CPU)
        pack_linear_layers(model)
    if index is None and config.index:
        index = NgramIndex.load(config.index)
    drafter = build_drafter(index, config.drafter)
    generator = SpeculativeGenerator(model, tokenizer, drafter, config, fast_forward=fast or False)
    if config.experimental.profile_step_costs:
        t0 = time.perf_counter()
        table = generator.profile_step_costs()
        logger.info(
            "timed verification passes in %.1f s (ms by rows, then query tokens): %s",
            time.perf_counter() - t0,
            {rows: {q: round(1000 * s, 1) for q, s in cells.items()} for rows, cells in table.items()},
        )
    return generator
