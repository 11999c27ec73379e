"""load_engine: the one way the CLI, the Ray stages and the Serve replicas build a SpeculativeGenerator."""

from __future__ import annotations

import logging
import time

from tasc_ray.models import load_model
from tasc_ray.spec.config import EngineConfig
from tasc_ray.spec.drafter import build_drafter
from tasc_ray.spec.fast_forward import build_fast_forward
from tasc_ray.spec.generator import SpeculativeGenerator
from tasc_ray.spec.index import NgramIndex
from tasc_ray.spec.packed_linear import pack_linear_layers

__all__ = ["EngineConfig", "load_engine"]

logger = logging.getLogger(__name__)


def load_engine(config: EngineConfig, index: NgramIndex | None = None) -> SpeculativeGenerator:
    """Load the model (and the index, unless given) and build the generator; refuses a mismatched index."""
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    fast = build_fast_forward(model) if config.fast_forward else None
    if config.packed_linear and fast is None:  # the model's own forward runs: on packed layers
        pack_linear_layers(model)
    if index is None and config.index:
        index = NgramIndex.load(config.index)
    generator = SpeculativeGenerator(
        model,
        tokenizer,
        build_drafter(index, config.drafter, tokenizer),
        max_batch_size=config.max_batch_size,
        static_batches=config.scheduling == "static",
        fast_forward=fast if fast is not None else False,
        speculation_gate=config.speculation_gate,
    )
    if config.profile_step_costs:
        t0 = time.perf_counter()
        table = generator.profile_step_costs()
        logger.info(
            "timed verification passes in %.1f s (ms by rows, then query tokens): %s",
            time.perf_counter() - t0,
            {rows: {q: round(1000 * s, 1) for q, s in cells.items()} for rows, cells in table.items()},
        )
    return generator
