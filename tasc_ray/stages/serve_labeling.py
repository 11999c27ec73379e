"""Batch labeling through a running tasc_ray Serve app: the labeling stage with the app's engine replicas doing the
decoding instead of an actor pool that loads its own engines.

    info = engine_app("tasc")                       # ServeAppError (one line) unless "tasc" runs a tasc_ray engine
    ds = label_dataset_through_serve(ds, "tasc", "{prompt}", SamplingParams(max_new_tokens=64))

`label_parquet(..., serve_app=NAME)` (and `tasc-ray label --serve-app NAME`) runs this stage under the same job:
the same input checks, resume and atomic commit, the same output columns. A small pool of `ServeLabelWorker`s
(0.1 CPU each by default) renders and tokenises each row's prompt with `PromptTemplate` and the app's own tokenizer
(the model source the replicas loaded, so the token ids are what the ingress would send), then sends up to
`max_in_flight` rows at a time to the app's `TascEngine` deployment through a DeploymentHandle
(`generate_batch_row`). A replica admits batch rows only into the rows its online requests leave
(`Request.priority`), and a finished batch row joins its live overlay as an online one does. A row whose call fails
because its replica died or is restarting is sent again, up to `max_attempts` times with a growing pause, so a
replica lost mid-batch costs retries, not rows; a row that still fails, or fails in the engine, gets its `error`.
Greedy outputs are those of the actor-pool path: the same prompt, the same token ids, the same engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pyarrow as pa

from tasc_ray.engine.generator import GenerationResult, SamplingParams
from tasc_ray.stages.labeling import LabelBatch, LabelError, PromptTemplate, check_keep_columns

logger = logging.getLogger(__name__)

__all__ = ["ServeAppError", "ServeLabelWorker", "engine_app", "label_dataset_through_serve"]

INFO_TIMEOUT_S = 60.0  # how long the app's engine may take to answer `info` (a replica still starting)
MAX_ATTEMPTS = 5  # calls of one row when its replica dies or is unavailable
RETRY_PAUSE_S = 1.0  # the pause before the first retry; doubled at each next one, at most MAX_RETRY_PAUSE_S
MAX_RETRY_PAUSE_S = 8.0


class ServeAppError(LabelError):
    """`--serve-app` names no running app, or an app that does not run a tasc_ray engine."""


class ReplicaUnavailable(RuntimeError):
    """A row's calls failed on dead or unavailable replicas as many times as allowed."""


def _apps_text(apps: Any) -> str:
    return ", ".join(repr(a) for a in sorted(apps)) or "none"


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def engine_app(app_name: str, timeout_s: float = INFO_TIMEOUT_S) -> dict[str, Any]:
    """The state one of `app_name`'s engine replicas reports (`TascEngine.info`: model source, index, context),
    after checking that the app runs on this Ray cluster with a tasc_ray engine deployment. Raises ServeAppError
    naming the app and the apps there are. Ray must be running."""
    from ray import serve

    from tasc_ray.serving.config import ENGINE_DEPLOYMENT

    apps = serve.status().applications
    if app_name not in apps:
        raise ServeAppError(f"no Serve app {app_name!r} runs on this Ray cluster (its apps: {_apps_text(apps)})")
    deployments = sorted(apps[app_name].deployments)
    if ENGINE_DEPLOYMENT not in deployments:
        raise ServeAppError(
            f"Serve app {app_name!r} is not a tasc_ray app: it has no {ENGINE_DEPLOYMENT} deployment "
            f"(its deployments: {', '.join(deployments) or 'none'}; the apps: {_apps_text(apps)})"
        )
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name)
    try:
        info = handle.info.remote().result(timeout_s=timeout_s)
    except Exception as exc:
        raise ServeAppError(
            f"Serve app {app_name!r}: its {ENGINE_DEPLOYMENT} deployment did not answer as a tasc_ray engine "
            f"({_first_line(exc)})"
        ) from exc
    if not isinstance(info, dict) or not {"model_source", "max_context"} <= set(info):
        raise ServeAppError(f"Serve app {app_name!r}: its {ENGINE_DEPLOYMENT} deployment is not a tasc_ray engine")
    return info


class ServeLabelWorker:
    """One stage worker: tokenises its batch's prompts and sends the rows to the app's engine deployment."""

    def __init__(
        self,
        app_name: str,
        template: str,
        id_column: str,
        sampling: SamplingParams,
        keep_columns: list[str] | None = None,
        max_in_flight: int = 16,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        from ray import serve

        from tasc_ray.models import load_tokenizer
        from tasc_ray.serving.config import ENGINE_DEPLOYMENT

        info = engine_app(app_name)
        self.handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name)
        self.tokenizer = load_tokenizer(info["model_source"])
        self.max_context = int(info["max_context"])
        self.app_name, self.template, self.id_column, self.params = (
            app_name,
            PromptTemplate(template),
            id_column,
            sampling,
        )
        self.keep_columns = list(keep_columns or [])
        self.max_in_flight, self.max_attempts = max_in_flight, max_attempts

    def __call__(self, batch: pa.Table) -> pa.Table:
        from tasc_ray.engine.prompts import encode_prompt

        labels = LabelBatch(batch, self.id_column, self.keep_columns)
        prompts = labels.encode(self.template, lambda text: encode_prompt(self.tokenizer, text, self.max_context))
        ids = labels.out["id"]
        for i, (result, latency_s) in asyncio.run(self._generate(prompts, ids)).items():
            labels.fill(i, result, latency_s)
        return labels.table()

    async def _generate(
        self, prompts: dict[int, list[int]], ids: list[Any]
    ) -> dict[int, tuple[GenerationResult | Exception, float]]:
        """Every prompt through the engine, `max_in_flight` at a time: {row: (result or error, latency)}."""
        slots = asyncio.Semaphore(self.max_in_flight)

        async def one(k: int, i: int) -> tuple[int, tuple[GenerationResult | Exception, float]]:
            async with slots:
                return i, await self._call(prompts[i], k, f"label-{ids[i]}")

        return dict(await asyncio.gather(*(one(k, i) for k, i in enumerate(prompts))))

    async def _call(self, prompt: list[int], row: int, request_id: str) -> tuple[GenerationResult | Exception, float]:
        """One row's call, sent again while its replica is dead or unavailable; (its result or error, its latency
        from admission to its last token, as the actor pool measures it, plus the call's transport)."""
        from ray.exceptions import RayTaskError

        from tasc_ray.serving.app import UNAVAILABLE

        pause = RETRY_PAUSE_S
        for attempt in range(1, self.max_attempts + 1):
            start = time.perf_counter()
            try:
                result = await self.handle.generate_batch_row.remote(prompt, self.params, row, request_id)
            except UNAVAILABLE as exc:
                if attempt == self.max_attempts:
                    message = f"{self.max_attempts} calls to app {self.app_name!r} failed, the last: {_first_line(exc)}"
                    return ReplicaUnavailable(message), 0.0
                logger.warning("row %s: %s; calling again in %.0f s", request_id, _first_line(exc), pause)
                await asyncio.sleep(pause)
                pause = min(2 * pause, MAX_RETRY_PAUSE_S)
                continue
            except RayTaskError as exc:  # the engine's own error for this row
                return (exc.cause if isinstance(exc.cause, Exception) else exc), 0.0
            except Exception as exc:
                return exc, 0.0
            return result, time.perf_counter() - start - result.stats.queued_s
        raise AssertionError("unreachable")


def label_dataset_through_serve(
    ds: Any,
    app_name: str,
    template: str,
    sampling: SamplingParams,
    *,
    id_column: str = "id",
    max_in_flight: int = 16,
    num_workers: int = 1,
    num_cpus_per_worker: float | None = None,
    rows_per_call: int | None = None,
    keep_columns: list[str] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> Any:
    """The labeling stage on a running app: a Ray Dataset of input rows -> a Dataset of OUTPUT_COLUMNS rows, then
    `keep_columns` (as `label_dataset`). `num_workers` workers (0.1 CPU each by default) each keep up to
    `max_in_flight` rows in the app's engine replicas, out of calls of `rows_per_call` rows (default 4 x
    max_in_flight). Keep num_workers x max_in_flight under the engine deployment's `max_ongoing_requests`, less
    what online traffic needs: calls past it wait in Serve's queue, ahead of online requests arriving later."""
    from ray.data import ActorPoolStrategy

    if max_in_flight <= 0 or num_workers <= 0 or max_attempts <= 0:
        raise LabelError("max_in_flight, num_workers and max_attempts must be positive")
    return ds.map_batches(
        ServeLabelWorker,
        batch_size=rows_per_call or 4 * max_in_flight,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=num_workers),
        num_cpus=num_cpus_per_worker if num_cpus_per_worker is not None else 0.1,
        fn_constructor_kwargs={
            "app_name": app_name,
            "template": template,
            "id_column": id_column,
            "sampling": sampling,
            "keep_columns": check_keep_columns(list(keep_columns or []), id_column),
            "max_in_flight": max_in_flight,
            "max_attempts": max_attempts,
        },
    )
