"""CLI commands for what a serving endpoint learned: `overlay export` (its replicas' live overlays as a corpus) and
`overlay merge` (a corpus counted into an existing index).

Each engine replica's drafter keeps a live overlay, the n-grams of its last `live_outputs` finished outputs; it
carries over an index reload but not a restart. Before a restart (or to make it part of the next index):

    tasc-ray overlay export --url http://127.0.0.1:8000 --replicas 2 --out overlay.parquet
    tasc-ray overlay merge --corpus overlay.parquet --index idx --out idx-v2

then a `user_config` update (`index: idx-v2`) gives every replica the new index without a restart. `export` reads
`GET /v1/tasc/overlay` (one replica per call) until it has heard from `--replicas` distinct replicas, and writes
every output each one holds (repeats included: counts matter) as a parquet file with the columns `output` (text),
`token_ids` (list<int32>) and `replica`, written aside and renamed into place (local) or uploaded whole (s3://).
The file's schema metadata (`tasc_ray.overlay`) records the server's tokenizer, so `merge` refuses a corpus
exported from a model with another tokenizer than the index's.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from tasc_ray.cli.main import add_command
from tasc_ray.engine.drafts.index import MANIFEST, NgramIndex, NgramIndexError, tokenize_texts
from tasc_ray.io import (
    CorpusError,
    atomic_directory,
    atomic_write_bytes,
    check_output_location,
    inspect_files,
    is_free_directory,
    is_remote,
    list_files,
    local_path,
    read_columns,
    split_texts,
    storage_options_for,
)
from tasc_ray.models import ModelNotFoundError, load_tokenizer
from tasc_ray.serving.config import OVERLAY_ROUTE

logger = logging.getLogger(__name__)

METADATA_KEY = b"tasc_ray.overlay"  # parquet schema metadata: the server, its replicas and its tokenizer (JSON)
API_KEY_ENV = "TASC_API_KEY"
SCHEMA = pa.schema([("output", pa.string()), ("token_ids", pa.list_(pa.int32())), ("replica", pa.string())])
TOKEN_IDS = "token_ids"


class OverlayError(ValueError):
    """An export or merge that cannot be done: an unreachable or foreign server, an empty overlay, a bad corpus."""


def register(subparsers: argparse._SubParsersAction) -> None:
    overlay = subparsers.add_parser(
        "overlay",
        help="export what a serving endpoint learned (its live overlays) as a corpus, or merge a corpus into an index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = overlay.add_subparsers(dest="overlay_command", metavar="SUBCOMMAND", required=True)

    export = add_command(
        commands,
        "export",
        _export,
        "write the live overlays of a tasc_ray endpoint's replicas as a parquet corpus",
        "GET /v1/tasc/overlay until N distinct replicas answered (giving up after 4*N requests), then write every "
        "output they hold (repeats included) as a parquet file with the columns output, token_ids and replica, "
        "atomically (local or s3://). An empty overlay is an error and writes nothing.",
    )
    export.add_argument("--url", required=True, help="the endpoint's base URL, e.g. http://127.0.0.1:8000")
    export.add_argument("--out", required=True, help="the parquet file to write (local path or s3:// key)")
    export.add_argument(
        "--api-key", default=None, help=f"the server's API key, if it requires one; without it, ${API_KEY_ENV}"
    )
    export.add_argument("--replicas", type=int, default=1, help="distinct engine replicas to hear from")
    export.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each response")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    merge = add_command(
        commands,
        "merge",
        _merge,
        "count a corpus (e.g. an exported overlay) into an existing index and save the result",
        "Tokenise the corpus's text column with the index's tokenizer (the model named in its manifest, or "
        "--model), count it with the index's max order and top-k, merge it into the index (NgramIndex.merge) and "
        "save the result to --out, atomically. --index itself is replaced only when --out names it.",
    )
    merge.add_argument(
        "--corpus",
        required=True,
        action="append",
        help="parquet, jsonl, csv or text file, directory, glob or s3:// (repeatable); e.g. an `overlay export` file",
    )
    merge.add_argument("--index", required=True, help="the index to add the corpus to (directory or s3:// prefix)")
    merge.add_argument("--out", required=True, help="where to write the merged index (may equal --index)")
    merge.add_argument("--column", default="output", help="the corpus's text column")
    merge.add_argument(
        "--model",
        "--tokenizer",
        dest="model",
        default=None,
        help="model or tokenizer directory to tokenise with; without it, the tokenizer named in the index's manifest",
    )
    merge.add_argument(
        "--token-ids",
        action="store_true",
        help="count the corpus's token_ids column as is (the ids the replicas generated, special tokens included) "
        "instead of tokenising --column; needs an `overlay export` corpus",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out other than --index")
    merge.add_argument(
        "--storage-options", type=_json_dict, default=None, help="fsspec options as JSON (e.g. endpoint_url) for s3://"
    )


def _json_dict(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return parsed


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
def fetch_overlays(
    url: str,
    replicas: int = 1,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> dict[str, dict[str, Any]]:
    """The overlay of each of `replicas` distinct engine replicas behind `url` (replica id -> response body),
    asking `GET /v1/tasc/overlay` at most 4 * replicas times; a replica heard twice keeps its latest answer."""
    if replicas < 1:
        raise OverlayError(f"--replicas must be at least 1, got {replicas}")
    endpoint = url.rstrip("/") + OVERLAY_ROUTE
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    tries = 4 * replicas
    heard: dict[str, dict[str, Any]] = {}
    unavailable = None
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for _ in range(tries):
            body = _get_overlay(client, endpoint)
            if body is None:  # 503: the replica asked is busy or restarting; another try may reach another one
                unavailable = "an engine replica was unavailable (503)"
                continue
            heard[body["replica"]] = body
            if len(heard) >= replicas:
                break
    if len(heard) < replicas:
        note = f"; {unavailable}" if unavailable else ""
        raise OverlayError(
            f"{endpoint}: heard from {len(heard)} of {replicas} replicas in {tries} requests{note}; check --replicas "
            "against the deployment's replica count, or retry"
        )
    return heard


def _get_overlay(client: httpx.Client, endpoint: str) -> dict[str, Any] | None:
    """One overlay response, checked; None for a 503 (retry)."""
    try:
        response = client.get(endpoint)
    except httpx.InvalidURL as exc:
        raise OverlayError(f"{endpoint}: not a valid URL ({exc}); pass --url like http://127.0.0.1:8000") from exc
    except httpx.UnsupportedProtocol as exc:
        raise OverlayError(f"{endpoint}: not an http(s) URL; pass --url like http://127.0.0.1:8000") from exc
    except httpx.TransportError as exc:
        raise OverlayError(f"cannot reach {endpoint}: {type(exc).__name__}: {exc or 'no answer'}") from exc
    status = response.status_code
    if status == 404:
        raise OverlayError(
            f"{endpoint}: 404 Not Found: not a tasc_ray server (or one without the overlay route); check --url"
        )
    if status in (401, 403):
        raise OverlayError(
            f"{endpoint}: the server refused the request ({status}: {_error_message(response)}); pass its API key "
            f"with --api-key or ${API_KEY_ENV}"
        )
    if status == 503:
        return None
    if status != 200:
        raise OverlayError(f"{endpoint}: HTTP {status}: {_error_message(response)}")
    try:
        body = response.json()
    except ValueError as exc:
        raise OverlayError(f"{endpoint}: the answer is not JSON: not a tasc_ray overlay response") from exc
    problem = _shape_problem(body)
    if problem:
        raise OverlayError(f"{endpoint}: not a tasc_ray overlay response ({problem})")
    return body


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason_phrase


def _shape_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "not a JSON object"
    if not isinstance(body.get("replica"), str) or not body["replica"]:
        return "no replica id"
    outputs, texts = body.get("outputs"), body.get("texts")
    if not isinstance(outputs, list) or not isinstance(texts, list) or len(outputs) != len(texts):
        return "outputs and texts are not lists of the same length"
    if not all(isinstance(o, list) and all(isinstance(t, int) for t in o) for o in outputs):
        return "outputs are not lists of token ids"
    if not all(isinstance(t, str) for t in texts):
        return "texts are not strings"
    return None


def overlay_table(overlays: dict[str, dict[str, Any]], source: str = "") -> pa.Table:
    """The corpus of the replicas' overlays (one row per output, repeats kept), with the server's tokenizer in the
    schema metadata; replicas that disagree on the tokenizer are refused."""
    tokenizers = {json.dumps(o.get("tokenizer") or {}, sort_keys=True) for o in overlays.values()}
    if len(tokenizers) > 1:
        raise OverlayError(f"{source}: the replicas use different tokenizers; export each deployment on its own")
    rows: dict[str, list[Any]] = {"output": [], "token_ids": [], "replica": []}
    for replica, body in overlays.items():
        rows["output"] += body["texts"]
        rows["token_ids"] += body["outputs"]
        rows["replica"] += [replica] * len(body["outputs"])
    first = next(iter(overlays.values()), {})
    meta = {
        "source": source,
        "exported_at": time.time(),
        "model": first.get("model"),
        "tokenizer": first.get("tokenizer") or {},
        "replicas": {r: len(o["outputs"]) for r, o in overlays.items()},
    }
    table = pa.table(rows, schema=SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def export_overlay(
    url: str,
    out: str,
    replicas: int = 1,
    api_key: str | None = None,
    timeout: float = 60.0,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fetch the overlays of `replicas` replicas behind `url` and write them to `out` as one parquet file."""
    opts = storage_options_for(out, storage_options)
    _check_file_output(out, opts, overwrite)  # before asking the server: a bad --out fails fast
    overlays = fetch_overlays(url, replicas, api_key, timeout)
    endpoint = url.rstrip("/") + OVERLAY_ROUTE
    total = sum(len(o["outputs"]) for o in overlays.values())
    if total == 0:
        live = any(o.get("live", True) for o in overlays.values())
        why = (
            "no output has finished on them since they started (or their index was swapped in)"
            if live
            else "their drafters keep no live overlay (live_outputs is 0, or draft mode is context)"
        )
        raise OverlayError(f"{endpoint}: the overlay of {len(overlays)} replica(s) is empty: {why}; nothing written")
    buf = io.BytesIO()
    pq.write_table(overlay_table(overlays, url), buf)
    try:
        atomic_write_bytes(out, buf.getvalue(), overwrite=overwrite, storage_options=opts)
    except FileExistsError as exc:  # written meanwhile
        raise OverlayError(f"{out} exists; pass --overwrite to replace it") from exc
    counts = {r: len(o["outputs"]) for r, o in overlays.items()}
    logger.info("exported %d outputs of %d replica(s) to %s", total, len(overlays), out)
    return {
        "outputs": total,
        "replicas": len(overlays),
        "out": out,
        "url": url,
        "per_replica": counts,
        "tokens": sum(len(ids) for o in overlays.values() for ids in o["outputs"]),
    }


def _check_file_output(out: str, opts: dict[str, Any], overwrite: bool) -> None:
    if is_remote(out):
        check_output_location(out.rsplit("/", 1)[0], opts)  # the bucket, and no object where the prefix would be
        return
    path = local_path(out)
    if os.path.isdir(path):
        raise OverlayError(f"{out} is a directory; --out names the parquet file to write")
    if os.path.exists(path) and not overwrite:
        raise OverlayError(f"{out} exists; pass --overwrite to replace it")
    check_output_location(os.path.dirname(path))


def _export(args: argparse.Namespace) -> dict[str, Any]:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    summary = export_overlay(args.url, args.out, args.replicas, api_key, args.timeout, args.overwrite)
    if not args.json:
        print(f"exported {summary['outputs']} outputs of {summary['replicas']} replica(s) -> {summary['out']}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------------------------
def _same_location(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(local_path(a)) == os.path.realpath(local_path(b))


def _tokenizer_for(index: NgramIndex, index_path: str, model: str | None) -> Any:
    """The tokenizer to count the corpus with: `model`, else the one the index's manifest names; it must be the
    index's (vocabulary size and fingerprint)."""
    if model is None:
        if not index.tokenizer_name:
            raise OverlayError(f"the manifest of {index_path} names no tokenizer; pass --model")
        try:
            tokenizer = load_tokenizer(index.tokenizer_name)
        except ModelNotFoundError as exc:
            raise OverlayError(
                f"cannot load the tokenizer {index.tokenizer_name!r} named in the manifest of {index_path} ({exc}); "
                "pass --model"
            ) from exc
    else:
        tokenizer = load_tokenizer(model)
    index.check_tokenizer(tokenizer)
    return tokenizer


def _check_corpus_tokenizer(index: NgramIndex, index_path: str, url: str, schema: pa.Schema) -> bool:
    """Refuse a corpus file exported from a server whose tokenizer is not the index's; whether it says which."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return False
    try:
        tok = json.loads(raw).get("tokenizer") or {}
    except (ValueError, AttributeError) as exc:
        raise CorpusError(f"{url}: unreadable {METADATA_KEY.decode()} metadata: {exc}") from exc
    fingerprint, vocab = tok.get("fingerprint"), tok.get("vocab_size")
    if (index.fingerprint and fingerprint and fingerprint != index.fingerprint) or (
        index.vocab_size and vocab and vocab != index.vocab_size
    ):
        raise NgramIndexError(
            f"{url} was exported from a server whose tokenizer is {tok.get('name')!r} (fingerprint {fingerprint}, "
            f"{vocab} tokens), but the index {index_path} was built for {index.tokenizer_name!r} (fingerprint "
            f"{index.fingerprint}, {index.vocab_size} tokens); merge it into an index of that model"
        )
    return bool(fingerprint)


def read_corpus_sequences(
    inputs: list[str],
    index: NgramIndex,
    index_path: str,
    column: str,
    tokenizer: Any,
    token_ids: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[list[int]], dict[str, int]]:
    """The corpus's outputs as token-id sequences (its `column` tokenised, or its token_ids column as is), and how
    many rows were read and skipped; each file's recorded tokenizer must be the index's."""
    name = ", ".join(inputs)
    files = list_files(inputs, storage_options)
    wanted = TOKEN_IDS if token_ids else column
    infos = inspect_files(files, [wanted])  # one-line error naming a file without the column
    known = [_check_corpus_tokenizer(index, index_path, files.url(i.path), i.schema) for i in infos]
    table = read_columns(files, [wanted], infos=infos)
    if not token_ids:
        texts, stats = split_texts(table.column(column))
        if not texts:
            raise CorpusError(f"{name}: column {column!r} has no non-empty text rows ({stats['rows']} rows)")
        sequences = [s.tolist() for s in tokenize_texts(texts, tokenizer)]
        return sequences, {"rows": stats["rows"], "skipped_rows": stats["rows"] - len(texts)}
    if not all(known):
        raise CorpusError(
            f"{name}: --token-ids needs a corpus written by `tasc-ray overlay export` (its files record the "
            f"tokenizer of the ids); count its text column (--column) instead"
        )
    field_type = table.schema.field(TOKEN_IDS).type
    if not (pa.types.is_list(field_type) or pa.types.is_large_list(field_type)):
        raise CorpusError(f"{name}: column {TOKEN_IDS!r} is {field_type}, not a list of token ids")
    rows = table.column(TOKEN_IDS).to_pylist()
    sequences = [ids for ids in rows if ids]
    vocab = len(tokenizer)
    for ids in sequences:
        bad = next((t for t in ids if t is None or not 0 <= t < vocab), -1)
        if bad != -1:
            raise CorpusError(f"{name}: token id {bad} is not in the tokenizer's vocabulary of {vocab} tokens")
    if not sequences:
        raise CorpusError(f"{name}: column {TOKEN_IDS!r} has no non-empty rows ({len(rows)} rows)")
    return sequences, {"rows": len(rows), "skipped_rows": len(rows) - len(sequences)}


def merge_corpus(
    corpus: list[str],
    index_path: str,
    out: str,
    column: str = "output",
    model: str | None = None,
    token_ids: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Count `corpus` with the index's tokenizer, max order and top-k, merge it into the index at `index_path`
    and save the result to `out` (written aside and moved into place; `index_path` only when `out` names it)."""
    t0 = time.perf_counter()
    in_place = _same_location(index_path, out)
    out_opts = storage_options_for(out, storage_options)
    check_output_location(out, out_opts)
    if not in_place and not overwrite and not is_free_directory(out, out_opts):
        raise OverlayError(
            f"{out} exists and is not empty; pass --overwrite, or --out {index_path} to replace the index itself"
        )
    index = NgramIndex.load(index_path, storage_options_for(index_path, storage_options))
    tokenizer = _tokenizer_for(index, index_path, model)
    sequences, stats = read_corpus_sequences(
        corpus, index, index_path, column, tokenizer, token_ids, storage_options_for(corpus[0], storage_options)
    )
    # the corpus's counts at the index's settings (min_count applies to the sums, in merge)
    added = NgramIndex.build(sequences, index.max_order, index.top_k, 1, tokenizer, suffix=index.suffix is not None)
    merged = index.merge(added)
    _save_index(merged, out, out_opts, replace=in_place or overwrite)
    summary = {
        "index": index_path,
        "corpus": corpus,
        "out": out,
        "in_place": in_place,
        "column": TOKEN_IDS if token_ids else column,
        **stats,
        "added_sequences": added.n_sequences,
        "added_tokens": added.n_tokens,
        "seconds": time.perf_counter() - t0,
        **merged.stats(),
    }
    logger.info("merged %d outputs (%d tokens) into %s -> %s", added.n_sequences, added.n_tokens, index_path, out)
    return json.loads(json.dumps(summary, default=str))


def _save_index(index: NgramIndex, out: str, opts: dict[str, Any], replace: bool) -> None:
    """Save so that `out` is never a half-written index: locally a sibling directory renamed into place; on S3 an
    upload with the manifest last, or, over an existing index, IndexWriter's own order (the old manifest removed
    first, the new one written last), since S3 cannot rename."""
    if is_remote(out) and replace and not is_free_directory(out, opts):
        index.save(out, opts)
        return
    if_exists = "replace" if replace else "error"
    with atomic_directory(out, if_exists=if_exists, last=MANIFEST, storage_options=opts) as tmp:
        index.save(str(tmp))


def _merge(args: argparse.Namespace) -> dict[str, Any]:
    summary = merge_corpus(
        args.corpus,
        args.index,
        args.out,
        args.column,
        args.model,
        args.token_ids,
        args.overwrite,
        args.storage_options,
    )
    if not args.json:
        print(
            f"merged {summary['added_sequences']} outputs ({summary['added_tokens']} tokens) into {summary['index']} "
            f"-> {summary['out']} ({summary['corpus_sequences']} outputs in all)"
        )
    return summary


__all__ = ["OverlayError", "export_overlay", "fetch_overlays", "merge_corpus", "overlay_table", "register"]
