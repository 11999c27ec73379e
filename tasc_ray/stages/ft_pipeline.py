"""TASC-ft as one resumable job: logged outputs (or a prompt/output corpus) in; a fine-tuned model that emits
fewer tokens, its TASC-spec index, its evaluation against the original model and, optionally, a Serve app running
it, out. `tasc-ray ft-pipeline` and `jobs/ft_pipeline.py` run it:

    summary = run_pipeline(PipelineConfig(model="smollm2-135m", work_dir="runs/e2e", request_log="logs/"))

The stages, in order, each writing one output under `work_dir` (a local directory):

    stage         output (under work_dir)  complete when it has   what
    input, split  data/                    split.json             read the rows; hold out `eval_size` prompts
    recipe        recipe.json              (the file)             with `recipe`: `choose_recipe` on the training rows
    enrich        enriched/                tasc_ft_vocab.json     `enrich_model` on the training outputs
    index         index/                   manifest.json          Ray Data index of them, original tokenizer
    finetune      model/                   finetune.json          Ray Train (`tasc_ray.stages.finetune.finetune`)
    model_index   model_index/             manifest.json          the same index with the enriched tokenizer
    evaluate      eval/                    eval.json              greedy decoding of the held-out prompts, both models
    deploy        (a Serve app)            (never skipped)        point `deploy_app` at model/ and model_index/

Every output is written aside and moved into place (`tasc_ray.io.atomic_directory`, an index's manifest last), so
a stage whose output is complete is skipped on a rerun, and an interrupted one runs again (fine-tuning resumes from
its latest Ray Train checkpoint, in `model.ray/`). `settings.json` records the settings that shape the outputs; a
rerun with other ones is refused instead of mixing two runs. `pipeline.json` is the last run's summary.

Enrichment runs before the index, so a corpus too small or too varied to enrich (no n-gram worth a token) stops the
job early with a message: nothing is fine-tuned or deployed. The evaluation reports the chosen metric (`METRICS`:
exact match, slot F1 over `key[value]` slots, corpus BLEU) of both models against the held-out outputs, and the
output tokens per row of both (the compression); the fine-tuned model is deployed only when its quality is at most
`quality_bound` points below the original's.

Deployment redeploys the application through Ray Serve's REST API (the dashboard's `/api/serve/applications/`)
with its builder arguments' `model` and `index` replaced (and an `index` in the engine's `user_config`, which
`reconfigure` would otherwise load on top): a new model has a new tokenizer, which the HTTP ingress tokenizes with
too, so both deployments restart on it; a `user_config` update (an index reload) cannot change the model. Only an
application deployed from a config (`serve deploy`, the REST API) can be updated so; the served model name is kept.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasc_ray.ft.enrich import REPORT_FILE, EnrichConfig, enrich_model
from tasc_ray.ft.recipe import RECIPE_FILE, RecipeOptions
from tasc_ray.ft.train import SUMMARY_FILE, FinetuneConfig
from tasc_ray.io import atomic_directory, atomic_write_bytes, is_remote, is_text_type, read_columns
from tasc_ray.metrics import METRICS, score

logger = logging.getLogger(__name__)

DATA, ENRICHED, INDEX, MODEL, MODEL_INDEX, EVAL = "data", "enriched", "index", "model", "model_index", "eval"
SPLIT_FILE, EVAL_FILE, SETTINGS_FILE, PIPELINE_FILE = "split.json", "eval.json", "settings.json", "pipeline.json"
INDEX_MANIFEST = "manifest.json"  # tasc_ray.engine.drafts.index.MANIFEST, written last
STAGES = ("input", "split", "recipe", "enrich", "index", "finetune", "model_index", "evaluate", "deploy")
# FinetuneConfig fields a rerun may change: where and how fast it trains, not what it trains.
RESOURCE_FIELDS = frozenset({"num_workers", "cpus_per_worker", "use_gpu", "max_failures", "trainer", "progress"})
LOG_COLUMNS = ("prompt", "output", "finish_reason")  # of the Serve request log (tasc_ray/serving/request_log.py)


class PipelineError(ValueError):
    """A pipeline that cannot run: its input, its settings against an earlier run's, its Serve application."""


@dataclass
class PipelineConfig:
    """One TASC-ft pipeline: the original model, the input (a corpus or a Serve request log), and each stage's
    settings (the enrichment recipe as `EnrichConfig`, the fine-tuning recipe as `FinetuneConfig` fields)."""

    model: str
    work_dir: str  # local; deployed from here, so on a multi-node cluster a volume every node mounts
    input: str | None = None  # a corpus with a prompt and an output column (parquet, jsonl, csv; local or s3://)
    request_log: str | None = None  # or: the log_dir of a Serve app (rows that finished with "stop")
    prompt_column: str = "prompt"
    output_column: str = "output"
    eval_size: int = 100  # distinct prompts held out for the evaluation
    seed: int = 0  # the split's (and the enrichment's held-out part's and the training's) seed
    metric: str = "exact_match"
    quality_bound: float = 1.0  # most metric points the fine-tuned model may lose and still be deployed
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    eval_batch_size: int = 8
    index_workers: int = 2
    enrich: EnrichConfig = field(default_factory=EnrichConfig)
    untie_embeddings: bool = False
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields but model, train, out, columns
    storage_path: str | None = None  # Ray Train checkpoints (default <work_dir>/model.ray)
    deploy_app: str | None = None  # a Serve application to point at the new model
    serve_address: str | None = None  # the Ray dashboard serving Serve's REST API, e.g. http://127.0.0.1:8265
    progress: bool = True
    # `--recipe auto`: choose the enrichment recipe on the training rows first (`tasc_ray.ft.recipe`), with the
    # pipeline's metric and quality bound; `enrich`'s budget, min-count and seed are the candidates' base. The CLI
    # hands it over inside `finetune` (`tasc_ray.cli.ft.finetune_options`), where __post_init__ takes it from.
    recipe: RecipeOptions | None = None

    def __post_init__(self) -> None:
        handed = self.finetune.get("recipe")
        if handed is not None:
            self.finetune = {k: v for k, v in self.finetune.items() if k != "recipe"}
            self.recipe = handed if isinstance(handed, RecipeOptions) else RecipeOptions(**handed)

    def validate(self) -> None:
        if (self.input is None) == (self.request_log is None):
            raise PipelineError("give one input: a corpus (input) or a Serve request log (request_log)")
        if is_remote(self.work_dir):
            raise PipelineError(f"work_dir must be a local directory (models are written there), got {self.work_dir}")
        if self.eval_size < 1:
            raise PipelineError(f"eval_size must be >= 1, got {self.eval_size}")
        if self.metric not in METRICS:
            raise PipelineError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.max_new_tokens < 1 or self.eval_batch_size < 1 or self.index_workers < 1:
            raise PipelineError("max_new_tokens, eval_batch_size and index_workers must be >= 1")
        if self.deploy_app and not self.serve_address:
            raise PipelineError("deploy_app needs serve_address (the Ray dashboard, e.g. http://127.0.0.1:8265)")
        self.enrich.validate()
        if self.recipe is not None:
            self.recipe.validate()
        self.finetune_config().validate()

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tuning stage's job: the enriched model on the training split, saved to `model/`."""
        options = {"progress": self.progress, **self.finetune}
        work = Path(self.work_dir).expanduser().resolve()
        storage = self.storage_path or str(work / f"{MODEL}.ray")
        train = str(work / DATA / "train.parquet")
        return FinetuneConfig(
            model=str(work / ENRICHED), train=train, out=str(work / MODEL), storage_path=storage, **options
        )

    def settings(self) -> dict[str, Any]:
        """The settings that shape the outputs (what a rerun of the same work_dir must keep)."""
        data = asdict(self)
        for key in ("quality_bound", "deploy_app", "serve_address", "progress", "eval_batch_size", "index_workers"):
            data.pop(key)
        data["finetune"] = {k: v for k, v in self.finetune.items() if k not in RESOURCE_FIELDS}
        return json.loads(json.dumps(data, default=str))


# ----------------------------------------------------------------------------------------------------------------
# input and split
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """The usable (prompt, output) rows of the input, and how many were left out and why."""

    prompts: list[str]
    outputs: list[str]
    stats: dict[str, int]


def read_rows(cfg: PipelineConfig) -> Rows:
    """The rows with a non-empty prompt and output; from a request log, only those that finished with "stop" (a
    truncated output is no training target). A missing column is an error naming it and the columns there are."""
    log = cfg.request_log is not None
    source = cfg.request_log if log else cfg.input
    assert source is not None
    prompt, output = ("prompt", "output") if log else (cfg.prompt_column, cfg.output_column)
    columns = list(LOG_COLUMNS) if log else list(dict.fromkeys([prompt, output]))
    table = read_columns(source, columns, what="request log" if log else "corpus")
    for name in (prompt, output):
        if not is_text_type(table.column(name).type):
            raise PipelineError(f"{source}: column {name!r} holds {table.column(name).type}, not text")
    prompts, outputs = table.column(prompt).to_pylist(), table.column(output).to_pylist()
    finished = table.column("finish_reason").to_pylist() if log else ["stop"] * len(prompts)
    stats = {"rows": len(prompts), "skipped_empty": 0, "skipped_unfinished": 0}
    keep_p, keep_o = [], []
    for p, o, reason in zip(prompts, outputs, finished):
        if not p or not o or not o.strip():
            stats["skipped_empty"] += 1
        elif reason != "stop":
            stats["skipped_unfinished"] += 1
        else:
            keep_p.append(p)
            keep_o.append(o)
    if not keep_p:
        raise PipelineError(f"{source}: no rows with a non-empty prompt and output ({stats})")
    if len(keep_p) < stats["rows"]:
        logger.warning("%s: left out %d of %d rows (%s)", source, stats["rows"] - len(keep_p), stats["rows"], stats)
    return Rows(keep_p, keep_o, stats)


def split_rows(prompts: Sequence[str], eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, eval rows): `eval_size` distinct prompts, drawn with `seed`, are held out, each evaluated once
    (its first row); every row of the other prompts trains. By prompt, so no evaluated prompt was trained on."""
    distinct = sorted(set(prompts))
    if len(distinct) <= eval_size:
        raise PipelineError(
            f"the input has {len(distinct)} distinct prompts: too few to hold out {eval_size} for the evaluation "
            "and train on the rest (lower --eval-size, or log more requests)"
        )
    random.Random(seed).shuffle(distinct)
    held = set(distinct[:eval_size])
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if p in held:
            first.setdefault(p, i)
    return [i for i, p in enumerate(prompts) if p not in held], sorted(first.values())


def write_split(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Read the input, split it and write `data/` (train.parquet, eval.parquet with prompt and output columns,
    split.json last). Returns split.json's content."""
    rows = read_rows(cfg)
    train, held = split_rows(rows.prompts, cfg.eval_size, cfg.seed)
    info = {
        "source": cfg.request_log or cfg.input,
        "kind": "request_log" if cfg.request_log else "corpus",
        **rows.stats,
        "distinct_prompts": len(set(rows.prompts)),
        "train_rows": len(train),
        "eval_rows": len(held),
        "seed": cfg.seed,
    }
    with atomic_directory(out, last=SPLIT_FILE) as tmp:
        for name, idx in (("train", train), ("eval", held)):
            table = pa.table({"prompt": [rows.prompts[i] for i in idx], "output": [rows.outputs[i] for i in idx]})
            pq.write_table(table, tmp / f"{name}.parquet")
        (tmp / SPLIT_FILE).write_text(json.dumps(info, indent=2))
    logger.info("split %d rows: %d train, %d held-out prompts -> %s", rows.stats["rows"], len(train), len(held), out)
    return info


def read_pairs_table(path: Path) -> tuple[list[str], list[str]]:
    """(prompts, outputs) of a split file the split stage wrote."""
    table = pq.read_table(path, columns=["prompt", "output"])
    return table.column("prompt").to_pylist(), table.column("output").to_pylist()


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
def decode(model: str, index: str | None, prompts: list[str], cfg: PipelineConfig) -> dict[str, Any]:
    """Greedy outputs of `model` (TASC-spec with `index`: the same outputs as plain decoding) for the prompts: texts
    and output tokens per row, forward passes in all (a row that fails gets an empty text, no token count, and is
    counted in `errors`)."""
    from tasc_ray.engine.config import EngineConfig
    from tasc_ray.engine.load import load_engine
    from tasc_ray.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    generator = load_engine(EngineConfig(model=model, index=index, max_batch_size=cfg.eval_batch_size))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop=list(cfg.stop))
    results = generator.generate_each(prompts, params)
    for r in results:
        if isinstance(r, Exception):
            logger.warning("%s: a held-out row failed: %s", model, r)
    done = [r for r in results if not isinstance(r, Exception)]
    return {
        "texts": [r.text if not isinstance(r, Exception) else "" for r in results],
        "tokens": [r.new_tokens if not isinstance(r, Exception) else None for r in results],
        "passes": sum(r.stats.forward_passes for r in done),
        "errors": len(results) - len(done),
        "seconds": time.perf_counter() - t0,
    }


def _side(decoded: dict[str, Any], refs: list[str], metric: str) -> dict[str, Any]:
    """One model's line of the evaluation: quality, and output tokens and passes per row that did not fail."""
    tokens = [t for t in decoded["tokens"] if t is not None]
    rows = max(1, len(tokens))
    return {
        metric: round(score(metric, decoded["texts"], refs), 3),
        "output_tokens_per_row": round(sum(tokens) / rows, 3),
        "forward_passes_per_row": round(decoded["passes"] / rows, 3),
        "errors": decoded["errors"],
        "seconds": round(decoded["seconds"], 2),
    }


def write_evaluation(cfg: PipelineConfig, work: Path) -> dict[str, Any]:
    """Decode the held-out prompts with the original model (and its index) and the fine-tuned one (and its), score
    both against the held-out outputs and write `eval/` (predictions.parquet, eval.json last)."""
    prompts, refs = read_pairs_table(work / DATA / "eval.parquet")
    original = decode(cfg.model, str(work / INDEX), prompts, cfg)
    tuned = decode(str(work / MODEL), str(work / MODEL_INDEX), prompts, cfg)
    report: dict[str, Any] = {
        "metric": cfg.metric,
        "rows": len(prompts),
        "original": _side(original, refs, cfg.metric),
        "finetuned": _side(tuned, refs, cfg.metric),
    }
    before = report["original"]["output_tokens_per_row"]
    after = report["finetuned"]["output_tokens_per_row"]
    report["token_reduction"] = round(1 - after / before, 4) if before else 0.0
    report["quality_drop"] = round(report["original"][cfg.metric] - report["finetuned"][cfg.metric], 3)
    with atomic_directory(work / EVAL, last=EVAL_FILE) as tmp:
        predictions = {
            "prompt": prompts,
            "reference": refs,
            "original": original["texts"],
            "finetuned": tuned["texts"],
            "original_tokens": original["tokens"],
            "finetuned_tokens": tuned["tokens"],
        }
        pq.write_table(pa.table(predictions), tmp / "predictions.parquet")
        (tmp / EVAL_FILE).write_text(json.dumps(report, indent=2))
    logger.info(
        "held-out %s: original %.2f, fine-tuned %.2f; output tokens per row %.2f -> %.2f (%.1f%% fewer)",
        cfg.metric,
        report["original"][cfg.metric],
        report["finetuned"][cfg.metric],
        before,
        after,
        100 * report["token_reduction"],
    )
    return report


# ----------------------------------------------------------------------------------------------------------------
# deployment (Ray Serve's REST API)
# ----------------------------------------------------------------------------------------------------------------
def redeployed_config(details: dict[str, Any], app: str, model: str, index: str) -> dict[str, Any]:
    """The Serve deploy config (`PUT /api/serve/applications/`) that runs every application as `details` (`GET
    /api/serve/applications/`) shows them, with `app`'s model and index replaced and its served name kept."""
    apps = details.get("applications") or {}
    if app not in apps:
        raise PipelineError(f"no Serve application {app!r}; running: {', '.join(sorted(apps)) or 'none'}")
    configs = []
    for name, status in sorted(apps.items()):
        deployed = status.get("deployed_app_config")
        if deployed is None:
            raise PipelineError(
                f"Serve application {name!r} was started from Python (serve.run / `serve run`), which Serve's REST "
                "API cannot update; run it from a config (`serve deploy serve_apps/config.yaml`)"
            )
        configs.append(_with_model(deployed, model, index) if name == app else deployed)
    config: dict[str, Any] = {"applications": configs}
    for key in ("proxy_location", "http_options", "grpc_options", "target_capacity"):
        if details.get(key) is not None:
            config[key] = details[key]
    return config


def _with_model(app_config: dict[str, Any], model: str, index: str) -> dict[str, Any]:
    """An application's config (`tasc_ray.serving.config.ServeConfig` as its args) on another model and index."""
    from tasc_ray.serving.config import ENGINE_DEPLOYMENT, ServeConfig

    args = dict(app_config.get("args") or {})
    served_name = ServeConfig.model_validate(args).served_model_name
    engine = dict(args.pop("engine", None) or {})
    for key in ("model", "index"):
        args.pop(key, None)  # a top-level engine field overrides the nested one
    engine.update(model=model, index=index)
    args.update(engine=engine, model_name=args.get("model_name") or served_name)
    deployments = []
    for deployment in app_config.get("deployments") or []:
        user_config = deployment.get("user_config")
        if deployment.get("name") == ENGINE_DEPLOYMENT and isinstance(user_config, dict) and "index" in user_config:
            deployment = {**deployment, "user_config": {**user_config, "index": index}}
        deployments.append(deployment)
    return {**app_config, "args": args, "deployments": deployments}


def dashboard_headers() -> dict[str, str]:
    """The headers a request to the Ray dashboard needs: with Ray's token authentication on, its token (from
    RAY_AUTH_TOKEN or Ray's token file, loaded as `ray job submit` loads it); none otherwise."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    return dict(get_auth_headers_if_auth_enabled({}))


def deploy(address: str, app: str, model: str, index: str, timeout: float = 30.0) -> dict[str, Any]:
    """Redeploy Serve application `app` (through the Ray dashboard at `address`) on `model` and `index`."""
    import httpx

    url = f"{address.rstrip('/')}/api/serve/applications/"
    headers = dashboard_headers()
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
        response.raise_for_status()
        config = redeployed_config(response.json(), app, model, index)
        response = httpx.put(url, json=config, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise PipelineError(f"Serve's REST API at {url}: {exc}") from exc
    if response.status_code >= 400:
        raise PipelineError(f"Serve refused the new config ({response.status_code}): {response.text[:500]}")
    logger.info("redeployed Serve application %r on %s (index %s)", app, model, index)
    return {"app": app, "address": address, "model": model, "index": index}


# ----------------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------------
def _check_settings(cfg: PipelineConfig, work: Path) -> None:
    """Record the run's settings, or refuse ones that differ from those of the run that wrote work_dir."""
    path, settings = work / SETTINGS_FILE, cfg.settings()
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise PipelineError(
                f"{work} holds a run with other settings ({', '.join(changed)}); rerun with the same ones to resume, "
                "or use a new work directory"
            )
        return
    atomic_write_bytes(path, json.dumps(settings, indent=2).encode())


class _Stages:
    """The run's stage log: each stage done, skipped (its output was complete) or not run, with what it said."""

    def __init__(self) -> None:
        self.log: dict[str, dict[str, Any]] = {name: {"status": "not run"} for name in STAGES}

    def run(self, name: str, done: Path | None, out: Path | None, work: Callable[[], dict[str, Any]]) -> None:
        """Run stage `name` unless its marker `done` exists; `work` returns what the stage reports."""
        number = f"{STAGES.index(name) + 1}/{len(STAGES)}"
        if done is not None and done.is_file():
            logger.info("stage %s %s: skipped (%s is complete)", number, name, out)
            self.log[name] = {"status": "skipped", "out": str(out)}
            return
        logger.info("stage %s %s: running", number, name)
        t0 = time.perf_counter()
        report = work()
        self.log[name] = {
            "status": "done",
            "out": str(out) if out else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        self.log[name].update(report)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns its summary (also written to work_dir/pipeline.json). `status` is
    "deployed", "ready" (not asked to deploy), "rejected" (quality fell more than quality_bound; not deployed) or
    "no-op" (enrichment found nothing to add; nothing fine-tuned). Ray (RAY_ADDRESS, or a local one) is joined only
    after the enrichment, so bad input and a no-op never start it."""
    import ray

    from tasc_ray.stages.runtime import ensure_ray

    cfg.validate()
    work = Path(cfg.work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg, work)
    stages = _Stages()
    summary = _prepare(cfg, work, stages)
    if summary.get("status") != "no-op":
        started = ensure_ray()
        try:
            summary = _train_and_release(cfg, work, stages, summary)
        finally:
            if started:
                ray.shutdown()
    atomic_write_bytes(work / PIPELINE_FILE, json.dumps(summary, indent=2, default=str).encode())
    return summary


def _prepare(cfg: PipelineConfig, work: Path, stages: _Stages) -> dict[str, Any]:
    """The stages that need no Ray: input, split, enrich. The summary so far (status "no-op" when nothing was
    added to the vocabulary)."""
    data = work / DATA
    stages.run("split", data / SPLIT_FILE, data, lambda: write_split(cfg, data))
    split = json.loads((data / SPLIT_FILE).read_text())
    stages.log["input"] = {"status": stages.log["split"]["status"], "source": split["source"], "rows": split["rows"]}
    train_prompts, train_outputs = read_pairs_table(data / "train.parquet")

    enrich_cfg, untie = cfg.enrich, cfg.untie_embeddings
    if cfg.recipe is not None:
        stages.run(
            "recipe", work / RECIPE_FILE, work / RECIPE_FILE, lambda: _choose(cfg, work, train_outputs, train_prompts)
        )
        choice = json.loads((work / RECIPE_FILE).read_text())
        if choice["chosen"] is None:
            summary: dict[str, Any] = {"work_dir": str(work), "metric": cfg.metric, "deployed": False}
            summary |= {"stages": stages.log, "recipe": choice, "status": "no-op", "message": choice["message"]}
            logger.warning("%s", choice["message"])
            return summary
        enrich_cfg = _chosen_config(cfg.enrich, choice)

    def enrich() -> dict[str, Any]:
        prompts = train_prompts if enrich_cfg.max_copied < 1.0 else None
        out = work / ENRICHED
        report = enrich_model(cfg.model, train_outputs, out, enrich_cfg, cfg.progress, prompts, untie)
        return {"new_tokens": report["n_new_tokens"]}

    stages.run("enrich", work / ENRICHED / REPORT_FILE, work / ENRICHED, enrich)
    vocab = json.loads((work / ENRICHED / REPORT_FILE).read_text())
    summary = {"work_dir": str(work), "metric": cfg.metric, "deployed": False, "stages": stages.log}
    if cfg.recipe is not None:
        summary["recipe"] = json.loads((work / RECIPE_FILE).read_text())
    summary["enrichment"] = {k: vocab[k] for k in ("n_new_tokens", "stop_reason", "tokens_per_output")}
    if vocab["n_new_tokens"] == 0:
        message = (
            f"enrichment added no token ({vocab['stop_reason']}) on {len(train_outputs)} training outputs: the corpus "
            f"is too small or too varied for TASC-ft (an n-gram must occur {cfg.enrich.min_count}+ times); nothing "
            "was fine-tuned or deployed"
        )
        logger.warning("%s", message)
        summary.update(status="no-op", message=message)
    return summary


def _choose(cfg: PipelineConfig, work: Path, outputs: list[str], prompts: list[str]) -> dict[str, Any]:
    """The recipe stage: `choose_recipe` on the training rows with the pipeline's metric and bound; writes
    recipe.json (the choice and every candidate's evidence) and logs the table of candidates. The distill recipe is
    no candidate: the pipeline trains on its input's outputs, which, from a request log, are the served model's own
    (what distillation would train on)."""
    assert cfg.recipe is not None
    choice = cfg.recipe.choose(
        outputs,
        prompts,
        cfg.metric,
        cfg.quality_bound,
        model=cfg.model,
        base_config=cfg.enrich,
        stop=cfg.stop or ("\n",),
        max_new_tokens=cfg.max_new_tokens,
        distill=False,
        seed=cfg.seed,
    )
    logger.info("recipe choice:\n%s", choice.table())
    atomic_write_bytes(work / RECIPE_FILE, json.dumps(choice.to_dict(), indent=2).encode())
    return {"chosen": choice.chosen.name if choice.chosen else None}


def _chosen_config(base: EnrichConfig, choice: dict[str, Any]) -> EnrichConfig:
    """The enrichment config of recipe.json's chosen recipe on top of the pipeline's own."""
    from tasc_ray.ft.recipe import Recipe

    fields = dict(choice["chosen_recipe"])
    fields["key_end"] = tuple(fields["key_end"])
    return Recipe(**fields).enrich_config(base)


def _train_and_release(cfg: PipelineConfig, work: Path, stages: _Stages, summary: dict[str, Any]) -> dict[str, Any]:
    """The stages on Ray and after: index, finetune, model_index, evaluate, and the deployment or its refusal."""
    from tasc_ray.models import load_tokenizer
    from tasc_ray.stages.finetune import finetune
    from tasc_ray.stages.index_job import index_corpus

    data = work / DATA

    def index(model: str, out: Path) -> Callable[[], dict[str, Any]]:
        def build() -> dict[str, Any]:
            tokenizer = load_tokenizer(model)
            result = index_corpus(
                str(data / "train.parquet"), str(out), tokenizer, column="output", num_workers=cfg.index_workers
            )
            return {k: result[k] for k in ("sequences", "tokens")}

        return build

    stages.run("index", work / INDEX / INDEX_MANIFEST, work / INDEX, index(cfg.model, work / INDEX))
    ft = cfg.finetune_config()
    stages.run("finetune", work / MODEL / SUMMARY_FILE, work / MODEL, lambda: _finetuned(finetune(ft)))
    stages.run(
        "model_index", work / MODEL_INDEX / INDEX_MANIFEST, work / MODEL_INDEX, index(ft.out, work / MODEL_INDEX)
    )
    stages.run("evaluate", work / EVAL / EVAL_FILE, work / EVAL, lambda: {"rows": write_evaluation(cfg, work)["rows"]})
    evaluation = json.loads((work / EVAL / EVAL_FILE).read_text())
    summary.update(evaluation=evaluation, model=str(work / MODEL), index=str(work / MODEL_INDEX))
    drop = evaluation["quality_drop"]
    if drop > cfg.quality_bound:
        message = (
            f"not deployed: held-out {cfg.metric} fell {drop:.2f} points (original "
            f"{evaluation['original'][cfg.metric]:.2f}, fine-tuned {evaluation['finetuned'][cfg.metric]:.2f}), more "
            f"than the quality bound of {cfg.quality_bound:g}; the model is kept for inspection in {work / MODEL}"
        )
        logger.warning("%s", message)
        stages.log["deploy"] = {"status": "refused"}
        return {**summary, "status": "rejected", "message": message}
    if not cfg.deploy_app:
        message = f"ready: {work / MODEL} with index {work / MODEL_INDEX} (no Serve application to deploy to)"
        return {**summary, "status": "ready", "message": message}
    app, address = cfg.deploy_app, cfg.serve_address or ""
    stages.run("deploy", None, None, lambda: deploy(address, app, ft.out, str(work / MODEL_INDEX)))
    message = f"deployed {work / MODEL} to Serve application {cfg.deploy_app!r}"
    return {**summary, "status": "deployed", "deployed": True, "message": message}


def _finetuned(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("epochs_done", "steps", "final_loss", "resumed_from_epoch", "backend")}
