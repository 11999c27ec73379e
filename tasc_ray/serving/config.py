"""What a TASC Serve application is configured with.

`ServeConfig` is the application builder's argument (the YAML `args`, or `serve run ... key=value`): the engine's
`EngineConfig` nested as `engine`, plus the HTTP and replica settings. `IndexUpdate` is the deployment's
`user_config`, applied to running replicas without a restart. Both accept nested settings flat: EngineConfig's
fields (and the drafter's) at ServeConfig's top level, DrafterConfig's fields at IndexUpdate's top level.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasc_ray.engine.config import DrafterConfig, EngineConfig

APP_NAME = "tasc"
INGRESS_DEPLOYMENT = "OpenAIIngress"  # HTTP, validation, tokenization (app.py)
ENGINE_DEPLOYMENT = "TascEngine"  # the model, the index, the engine loop; takes user_config (engine_deployment.py)
PREFIX_ROUTER = "tasc_ray.serving.routing.PrefixAffinityRouter"  # routing.py: rows sharing a prefix, one replica
OVERLAY_ROUTE = "/v1/tasc/overlay"  # GET: one engine replica's live overlay (app.py; `tasc-ray overlay export`)
# engine.max_batch_size when serving (EngineConfig's own default is 8): the rows a replica's engine loop decodes
# at once; more requests wait in its queue and join as rows finish.
SERVE_MAX_BATCH_SIZE = 16
# Accepted at ServeConfig's top level and moved into `engine` (EngineConfig moves the drafter's on into `drafter`).
ENGINE_FIELDS = frozenset(EngineConfig.model_fields) | frozenset(DrafterConfig.model_fields)
_NULLS = ("none", "null", "")  # `serve run ... index=None` passes strings
_NULLABLE_ENGINE = ("index", "device")
_NULLABLE = ("num_replicas", "num_gpus", "num_threads", "api_key", "api_key_env", "model_name", "log_dir")


def _nest(data: dict[str, Any], key: str, fields: Collection[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `data` into (the rest, the dict at `key` with the `fields` given at the top level moved into it)."""
    rest = dict(data)
    inner = dict(rest.pop(key, None) or {})
    for name in list(rest):
        if name in fields:
            inner[name] = rest.pop(name)
    return rest, inner


def _is_null(value: Any) -> bool:
    return isinstance(value, str) and value.lower() in _NULLS


class AutoscalingSettings(BaseModel):
    """Serve autoscaling for the replicas (replaces a fixed num_replicas)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump()


class IndexUpdate(BaseModel):
    """The replica's `user_config`: applied by `reconfigure` without restarting the replica.

    A field left out keeps its current value; `index: null` drops the index (prompt lookup only). Change
    `index_version` to reload an index rebuilt in place under the same path. DrafterConfig's fields (mode,
    min_path_prob, max_draft, ...) may be given at the top level; they are checked against DrafterConfig when
    applied. What the replica learned (its live overlay, its calibration) carries over the swap.
    `max_batch_size` changes how many rows the replica's engine loop decodes at once.
    """

    model_config = ConfigDict(extra="forbid")
    index: str | None = None
    index_version: str | int | None = None
    drafter: dict[str, Any] = Field(default_factory=dict, description="DrafterConfig fields to change")
    max_batch_size: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _nest_drafter_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data, drafter = _nest(data, "drafter", DrafterConfig.model_fields)
        if drafter:
            data["drafter"] = drafter
        return data

    def drafter_config(self, current: DrafterConfig) -> DrafterConfig:
        """`current` with this update's drafter fields applied (validated by DrafterConfig)."""
        return DrafterConfig.model_validate({**current.model_dump(), **self.drafter})


class ServeConfig(BaseModel):
    """Everything a TASC Serve application needs; EngineConfig's fields may also be given at the top level.

    `serve run serve_apps.openai_app:build_app model=smollm2-135m index=/path` passes flat strings; they are
    moved into `engine` here and validated by pydantic. `engine.max_batch_size` (top-level `max_batch_size`,
    16 unless given) is the rows its engine loop decodes at once.
    """

    model_config = ConfigDict(extra="forbid")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(max_batch_size=SERVE_MAX_BATCH_SIZE))
    model_name: str | None = Field(None, description="model id served on /v1/models (default: the model's name)")
    default_max_tokens: int = Field(128, ge=1)
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(
        1_000_000, ge=1, description="largest request body in bytes; a larger one is refused with a 413"
    )
    num_replicas: int | None = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica (fractional is fine)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica; default 1 when engine.device is cuda")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests an engine replica takes at once")
    request_router: Literal["prefix_affinity", "power_of_two"] = Field(
        "power_of_two",
        description="how engine calls pick a replica: prefix_affinity sends prompts sharing a prefix (a few-shot "
        "template) to the replica that holds it in its prefix cache unless it is much busier "
        "(tasc_ray/serving/routing.py); power_of_two (the default) is Serve's own",
    )
    prefix_imbalance_threshold: int = Field(
        8,
        ge=0,
        description="prefix_affinity: a prompt goes to its prefix's replica only while that replica's ongoing "
        "requests exceed the least loaded one's by at most this; else to the less loaded of two random replicas",
    )
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress (OpenAIIngress)")
    ingress_num_cpus: float = Field(0.1, gt=0, description="CPUs per ingress replica")
    api_key: str | None = Field(None, description="if set, /v1/* require 'Authorization: Bearer <key>'")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (e.g. a secret)")
    log_dir: str | None = Field(
        None,
        description="log each finished completion to parquet files here (a directory or s3:// prefix), the corpus "
        "of the next index (tasc_ray/serving/request_log.py)",
    )
    log_max_rows: int = Field(1000, ge=1, description="rows per logged parquet file")
    log_max_seconds: float = Field(300.0, gt=0, description="longest a logged row waits before its file is written")
    user_config: IndexUpdate | None = None

    @model_validator(mode="before")
    @classmethod
    def _lift_engine_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data, engine = _nest(data, "engine", ENGINE_FIELDS)
        engine.setdefault("max_batch_size", SERVE_MAX_BATCH_SIZE)
        for key in _NULLABLE_ENGINE:
            if _is_null(engine.get(key)):
                engine[key] = None
        data["engine"] = engine
        for key in _NULLABLE:
            if _is_null(data.get(key)):
                data[key] = None
        return data

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.autoscaling is not None:
            self.num_replicas = None
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.engine.model.rstrip("/")).name

    @property
    def gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if (self.engine.device or "").startswith("cuda") else 0.0

    def ingress_options(self) -> dict[str, Any]:
        """The `.options(...)` of the HTTP ingress: light replicas that never decode."""
        return {
            "num_replicas": self.ingress_replicas,
            "ray_actor_options": {"num_cpus": self.ingress_num_cpus},
            "max_ongoing_requests": 4 * self.max_ongoing_requests,
        }

    def deployment_options(self) -> dict[str, Any]:
        """The `.options(...)` of the engine deployment: replicas or autoscaling, resources, queue bound,
        user_config."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.gpus:
            actor["num_gpus"] = self.gpus
        options: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            options["num_replicas"] = self.num_replicas or 1
        if self.request_router == "prefix_affinity":
            options["request_router_config"] = {
                "request_router_class": PREFIX_ROUTER,
                "request_router_kwargs": {
                    # the engine caches prefixes of at least this many tokens: route by blocks of that size
                    "block_tokens": self.engine.scheduler.prefix_cache_min_tokens or 16,
                    "imbalance_threshold": self.prefix_imbalance_threshold,
                },
            }
        if self.user_config is not None:
            options["user_config"] = self.user_config.model_dump(exclude_unset=True)
        return options

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None
