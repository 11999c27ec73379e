"""The engine's settings, declared once: `EngineConfig` with one block per concern.

- `drafter` (DrafterConfig): where drafts come from and how large they may grow;
- `scheduler` (SchedulerConfig): admission into the batch, the shared-prefix cache, KV compaction;
- `experimental` (ExperimentalConfig): switches for measuring the engine, not for tuning a task.

The CLI's flags (`tasc_ray.cli.args`), the Serve YAML (`ServeConfig.engine`), the label stage, the simulator and
the benchmarks all read these classes, so a new setting is one field here. EngineConfig also accepts a block's
fields at its top level (`EngineConfig(index=..., mode="context")`, `serve run ... mode=context`).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "smollm2-135m"


class DraftMode(str, Enum):
    """Which statistics draft: the row's own context (prompt lookup), the task corpus, or both mixed."""

    CONTEXT = "context"
    CORPUS = "corpus"
    MIXED = "mixed"


class DrafterConfig(BaseModel):
    """How drafts are proposed (tasc_ray.engine.drafts.drafter): which sources, how deep, how wide."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    mode: DraftMode = Field(
        DraftMode.MIXED, description="draft from the row's context, the corpus index, or both mixed"
    )
    max_draft: int = Field(8, ge=0, description="most tokens drafted per step (k), a tree's greatest depth")
    min_path_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="stop drafting when the drafted path's estimated probability falls below this"
    )
    tree_nodes: int = Field(
        16,
        ge=0,
        description="draft token trees of up to this many nodes where verifying a full tree costs at most 2 plain "
        "steps (the measured step costs decide, per batch size, and how many nodes are verified); 0: chains only",
    )
    live_outputs: int = Field(
        1000,
        ge=0,
        description="learn online: add the n-grams of each finished output to an in-memory overlay of the corpus "
        "index, keeping this many recent outputs (0: off); with no index it is the corpus",
    )

    def for_index(self, has_index: bool) -> DrafterConfig:
        """The settings to use with or without a corpus index: no index (and no live overlay) means drafting from
        the context only."""
        if has_index or self.live_outputs > 0 or self.mode == DraftMode.CONTEXT:
            return self
        return self.model_copy(update={"mode": DraftMode.CONTEXT})


class SchedulerConfig(BaseModel):
    """How rows share the batch (tasc_ray.engine.scheduler): admission, the shared-prefix cache, compaction."""

    model_config = ConfigDict(extra="forbid")
    max_prefill_tokens: int = Field(
        8192, ge=1, description="padded prompt tokens admitted into the batch in one step (one prompt always is)"
    )
    prefix_cache_min_tokens: int = Field(
        16,
        ge=0,
        description="shortest shared prompt prefix (a few-shot template, a system prompt) prefilled once "
        "and reused; 0: no prefix cache",
    )
    prefix_cache_entries: int = Field(4, ge=1, description="shared prompt prefixes kept, least recently used evicted")
    compact_waste: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="compact the KV cache when this share of its slots is masked (rejected "
        "drafts, finished rows, padding)",
    )


class ExperimentalConfig(BaseModel):
    """Switches for measuring and debugging the engine; the defaults are what tasc_ray ships and tests."""

    model_config = ConfigDict(extra="forbid")
    fast_forward: bool = Field(
        True,
        description="decode Llama-family models with the engine's lean forward (checked against the model's own "
        "at start-up); off: the model's own forward, on packed linear layers on a CPU",
    )
    speculation_gate: bool = Field(
        True,
        description="switch drafting off for a batch size where the engine's passes with drafts emit fewer tokens "
        "per second than its passes without (retried now and then)",
    )
    profile_step_costs: bool = Field(
        True,
        description="at start-up, time verification passes by rows and query tokens (a few seconds on a CPU), so "
        "that draft lengths follow the measured cost of a pass",
    )


class EngineConfig(BaseModel):
    """What a generator needs: the model, an optional index, the batch size, and one block per concern."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        DEFAULT_MODEL, description="'smollm2-135m' (embedded SmolLM2-135M-Instruct) or a Hugging Face model directory"
    )
    index: str | None = Field(None, description="n-gram index directory or s3:// prefix (without: prompt lookup only)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model weights' dtype")
    device: str | None = Field(None, description="cpu or cuda; unset: cuda when present")
    max_batch_size: int = Field(8, ge=1, description="rows decoded together")
    precision: Literal["fp32", "bf16", "int8", "w8a8"] = Field(
        "fp32",
        description="what the fast forward's matrix products run in on a CPU: fp32; bf16 (weights and inputs "
        "rounded to bfloat16, float32 sums; needs AVX512-BF16, on AMX tiles where the CPU has them: plain decoding "
        "~1.6x faster at batch 8); int8 (weights as int8 with one scale per output, half bf16's weight bytes, "
        "inputs in bf16); or w8a8 (int8 weights and int8 inputs, one scale per input row, exact integer sums; "
        "needs AVX512-VNNI). Lossless within a precision: TASC output is identical to plain decoding at the same "
        "precision; bf16, int8 and w8a8 outputs differ from fp32 on some rows (benchmarks/results/)",
    )
    drafter: DrafterConfig = Field(default_factory=DrafterConfig, description="where drafts come from, how large")
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="admission, prefix cache, compaction"
    )
    experimental: ExperimentalConfig = Field(
        default_factory=ExperimentalConfig, description="switches for measuring the engine"
    )

    @model_validator(mode="before")
    @classmethod
    def _nest_block_fields(cls, data: Any) -> Any:
        """Move the fields of a block (drafter, scheduler, experimental) given at the top level into the block, so
        that `EngineConfig(index=..., mode="context")` and `serve run ... mode=context` work."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, block in BLOCKS.items():
            given = set(data) & set(block.model_fields)
            if not given:
                continue
            nested = data.get(name) or {}
            nested = nested.model_dump() if isinstance(nested, BaseModel) else dict(nested)
            nested.update({key: data.pop(key) for key in given})
            data[name] = nested
        return data


BLOCKS: dict[str, type[BaseModel]] = {
    "drafter": DrafterConfig,
    "scheduler": SchedulerConfig,
    "experimental": ExperimentalConfig,
}
