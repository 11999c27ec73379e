"""The engine's settings, declared once: `DrafterConfig` nested in `EngineConfig`.

The CLI's flags (`tasc_ray.cli.args`), the Serve YAML (`ServeConfig.engine`), the label stage, the simulator and
the benchmarks all read these classes, so a new drafter setting is one field here. EngineConfig also accepts
the drafter's fields at its top level (`EngineConfig(index=..., mode="context")`, `serve run ... mode=context`).
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
    """How drafts are proposed (see tasc_ray.spec.drafter)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    mode: DraftMode = Field(
        DraftMode.MIXED, description="draft from the row's context, the corpus index, or both mixed"
    )
    max_draft: int = Field(8, ge=0, description="most tokens drafted per step (k), a tree's greatest depth")
    lam: float = Field(
        0.5, ge=0.0, le=1.0, description="weight of the corpus distribution when both sources match as many tokens"
    )
    min_path_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="stop drafting when the drafted path's estimated probability falls below this"
    )
    context_order: int = Field(4, ge=2, description="n-gram order of the row's own context model")
    live_outputs: int = Field(
        1000,
        ge=0,
        description="learn online: add the n-grams of each finished output to an in-memory overlay of the corpus "
        "index, keeping this many recent outputs (0: off); with no index it is the corpus",
    )
    calibrate: bool = Field(
        True,
        description="pick draft tokens and how many to verify on acceptance probabilities learned from the engine's "
        "own verification passes (by source, match length and depth), not on raw n-gram frequencies",
    )
    tree_nodes: int = Field(
        16,
        ge=0,
        description="draft token trees of up to this many nodes where verifying them costs at most 2 plain steps "
        "(batch 1 on a CPU, a GPU; greedy rows; the step costs decide how many nodes are verified); 0: chains",
    )
    tree_branches: int = Field(3, ge=1, description="continuations a tree node considers from each source")
    prompt_grounding: bool = Field(
        False,
        description="rank the corpus's and the live overlay's continuations by how much of each token's text (words "
        "of 3+ letters, numbers) the row's prompt contains, so drafts copy the input's values (with the tokenizer); "
        "opt-in: it raises tokens per pass, but no wall-time gain has been measured on a CPU yet",
    )
    long_matches: bool = Field(
        True,
        description="match suffixes of any length (not only up to the n-gram order) in the row's tokens, the live "
        "overlay and the index's token store, where it has one",
    )

    def for_index(self, has_index: bool) -> DrafterConfig:
        """The settings to use with or without a corpus index: no index (and no live overlay) means drafting from
        the context only."""
        if has_index or self.live_outputs > 0 or self.mode == DraftMode.CONTEXT:
            return self
        return self.model_copy(update={"mode": DraftMode.CONTEXT})


class EngineConfig(BaseModel):
    """What a generator needs: the model, an optional index, the drafter's settings, the batch size."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        DEFAULT_MODEL, description="'smollm2-135m' (embedded SmolLM2-135M-Instruct) or a Hugging Face model directory"
    )
    index: str | None = Field(None, description="n-gram index directory or s3:// prefix (without: prompt lookup only)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model weights' dtype")
    device: str | None = Field(None, description="cpu or cuda; unset: cuda when present")
    max_batch_size: int = Field(8, ge=1, description="rows decoded together")
    scheduling: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: waiting rows join the running batch between steps; static: fixed batches that "
        "each run to their longest row (the engine before continuous batching, kept for comparison)",
    )
    fast_forward: bool = Field(
        True,
        description="decode Llama-family models (Llama, Mistral, Qwen2) with the engine's lean forward: fused "
        "products on packed weights, padding skipped, keys and values appended in place; checked against the "
        "model's own forward at start-up, which other models (and a failed check) keep",
    )
    packed_linear: bool = Field(
        True,
        description="where the fast forward does not apply, run linear layers on oneDNN-packed weights (float32 "
        "on CPU; elsewhere a no-op): faster small products, results within float rounding of eager",
    )
    speculation_gate: bool = Field(
        True,
        description="switch drafting off for a batch size where the engine's own passes with drafts emit fewer "
        "tokens per second than its passes without (retried now and then)",
    )
    profile_step_costs: bool = Field(
        True,
        description="at start-up, time verification passes by rows and query tokens (a few seconds on a CPU), so "
        "that draft lengths follow the measured cost of a pass",
    )
    drafter: DrafterConfig = Field(default_factory=DrafterConfig)

    @model_validator(mode="before")
    @classmethod
    def _nest_drafter_fields(cls, data: Any) -> Any:
        """Move DrafterConfig's fields given at the top level into `drafter`."""
        if not isinstance(data, dict) or not set(data) & set(DrafterConfig.model_fields):
            return data
        data = dict(data)
        drafter = data.get("drafter") or {}
        drafter = drafter.model_dump() if isinstance(drafter, DrafterConfig) else dict(drafter)
        for key in DrafterConfig.model_fields:
            if key in data:
                drafter[key] = data.pop(key)
        data["drafter"] = drafter
        return data
