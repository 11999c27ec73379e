"""TASC-ft fine-tuning on Ray Train, and the fine-tuning job (`finetune`) that the CLI, the jobs and the benchmarks run.

    summary = finetune(FinetuneConfig(model="models/enriched", train="train.parquet", out="models/ft"))

`finetune` reads the training rows (`tasc_ray.ft.train.read_pairs`), trains, and saves the merged model. The
default trainer is a `TorchTrainer` with `ScalingConfig(num_workers, use_gpu)` (gloo on CPU, nccl on GPU) whose
workers run `tasc_ray.ft.train.run_training` with a `RaySession`; `trainer="local"` runs the same loop
in-process (`tasc_ray.ft.train.train_local`).

Each epoch ends with a checkpoint (the trainable state and the optimizer) reported to the run's `storage_path`
(a local directory or `s3://...`, with the S3 settings of `tasc_ray.io` passed explicitly, since Ray Train's
controller runs in the cluster's environment). A run restarted with the same storage path and name resumes from
the latest checkpoint: Ray Train v2 restores the run's checkpoint state from storage, and workers pick it up
through `ray.train.get_checkpoint()`; `max_failures` retries worker failures the same way. The final weights are
merged (`merge_and_unload` for LoRA) and saved as a plain Hugging Face directory, written aside and moved into
place, so a half-written output never looks complete.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tasc_ray.ft.train import (
    STATE_FILE,
    EpochHook,
    FinetuneConfig,
    FinetuneError,
    LoopConfig,
    TrainOutcome,
    read_pairs,
    run_training,
    save_merged,
    select_gpu,
    train_local,
)
from tasc_ray.io import arrow_filesystem, is_free_directory, is_s3

logger = logging.getLogger(__name__)


class RaySession:
    """A Ray Train worker's view of its run (see `tasc_ray.ft.train.Session`)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_state(self) -> dict[str, Any] | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)

    def prepare(self, model: Any) -> Any:
        return self._torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if state is not None:
                torch.save(state, Path(d) / STATE_FILE)
                ckpt = Checkpoint.from_directory(d)
            self._train.report(metrics, checkpoint=ckpt)


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker entry point: {"loop": LoopConfig, "after_epoch": EpochHook or None}."""
    run_training(config["loop"], RaySession(), config.get("after_epoch"))


def fit_ray(
    cfg: FinetuneConfig, loop: LoopConfig, storage: str, name: str, after_epoch: EpochHook | None = None
) -> TrainOutcome:
    """Train with a TorchTrainer on the running Ray (or RAY_ADDRESS, or a local Ray), checkpointing to `storage`."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasc_ray.stages.runtime import ensure_ray

    ensure_ray()
    use_gpu, backend = select_gpu(cfg.use_gpu, ray.cluster_resources().get("GPU", 0.0) if cfg.use_gpu else None)
    cpus = cfg.cpus_per_worker or max(1.0, math.floor(ray.available_resources().get("CPU", 1.0) / cfg.num_workers))
    storage_fs, storage_path = arrow_filesystem(storage) if is_s3(storage) else (None, storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop, "after_epoch": after_epoch},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=None if use_gpu else {"CPU": cpus}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    return TrainOutcome(dict(result.metrics or {}), result.checkpoint.path, state, use_gpu, backend)


def prepare_job(cfg: FinetuneConfig) -> tuple[Path, LoopConfig]:
    """Check the job before any training: the config, a free output directory, the rows, a loadable tokenizer."""
    from tasc_ray.models import ModelNotFoundError, load_tokenizer, resolve_model

    cfg.validate()
    out = Path(cfg.out).expanduser().resolve()
    if not is_free_directory(out):
        raise FinetuneError(f"output directory {out} exists and is not empty")
    rows = read_pairs(cfg.train, cfg.prompt_column, cfg.output_column)
    model_path = resolve_model(cfg.model)
    try:
        load_tokenizer(model_path)
    except ModelNotFoundError as exc:
        raise FinetuneError(f"{cfg.model}: cannot load a tokenizer ({exc})") from exc
    return out, LoopConfig.from_job(cfg, model_path, rows)


def finetune(cfg: FinetuneConfig, *, after_epoch: EpochHook | None = None) -> dict[str, Any]:
    """Fine-tune (Ray Train by default) and save the merged model to cfg.out. Returns a summary dict.

    `after_epoch` is called by every worker after each epoch's checkpoint (tests inject failures with it)."""
    out, loop = prepare_job(cfg)
    storage, name = cfg.storage()
    recipe = "full" if cfg.full else f"LoRA r={cfg.lora_r}"
    logger.info(
        "fine-tuning %s (%s) on %d rows with %d worker(s) (%s trainer); run %s in %s",
        cfg.model,
        recipe,
        len(loop.rows),
        cfg.num_workers,
        cfg.trainer,
        name,
        storage,
    )
    t0 = time.perf_counter()
    train = train_local if cfg.trainer == "local" else fit_ray
    outcome = train(cfg, loop, storage, name, after_epoch)
    summary = {
        "model": cfg.model,
        "out": str(out),
        "run_name": name,
        "storage_path": storage,
        "trainer": cfg.trainer,
        "recipe": "full" if cfg.full else "lora",
        "rows": len(loop.rows),
        "epochs_done": outcome.state["epoch"],
        "steps": outcome.state["step"],
        "final_loss": outcome.metrics.get("loss"),
        "resumed_from_epoch": outcome.metrics.get("resumed_from_epoch"),
        "new_token_alignment": outcome.state.get("aligned"),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "backend": outcome.backend,
        "use_gpu": outcome.use_gpu,
        "num_workers": cfg.num_workers,
        "checkpoint": outcome.checkpoint,
        "config": asdict(cfg),
    }
    save_merged(loop, outcome.state["model"], out, summary, "cuda" if outcome.use_gpu else "cpu")
    return summary
