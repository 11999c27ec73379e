"""`python -m benchmarks drafters`: drafters side by side on the model's own greedy outputs (simulator, no timing).

For each task the model decodes `--n` held-out prompts greedily once (through the engine, cached on disk under
`--cache-dir`); every drafter then replays those exact outputs, teacher-forced, with the same prompts and the same
corpus index (the task's disjoint reference split), one row after another as the engine at batch 1 runs them. A
pass accepts the draft's prefix that equals the model's output plus the model's own next token, so tokens per pass
is what the engine would measure at batch 1 with the drafter, before the cost of verifying longer queries; "verified
per pass" is the draft tokens each pass sends to the model. Drafters:

- prompt lookup: the row's own n-grams only (our context mode);
- suffix decoding: a reimplementation of Suffix Decoding's rules (ArcticInference): suffix matches of any length
  over the row's tokens and over the corpus plus the outputs finished so far, every match length tried, the draft
  with the highest summed path probability kept, its length capped at `max_spec_factor` x the match length;
- ours, built up one component at a time: the bounded-order drafter (orders <= 4, raw frequencies); unbounded
  suffix matches; acceptance calibrated online by source, match length and depth; live learning of finished
  outputs; the default configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.common.report import provenance, write_report
from benchmarks.common.tasks import BUILTIN_TASKS, Task, load_task
from tasc_ray.cli.args import add_model_argument
from tasc_ray.models import load_model
from tasc_ray.spec.config import DrafterConfig, DraftMode
from tasc_ray.spec.drafter import DraftContext, Drafter
from tasc_ray.spec.fast_forward import build_fast_forward
from tasc_ray.spec.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.spec.index import tokenizer_fingerprint


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "drafters",
        help="drafters side by side on the model's greedy outputs (simulator)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--task", action="append", default=None, help="built-in task (repeatable; default: all)")
    p.add_argument("--n", type=int, default=48, help="held-out prompts per task")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="benchmarks/cache")
    p.add_argument("--json", dest="json_path", default="benchmarks/results/drafters_sim.json", metavar="FILE")
    p.set_defaults(handler=run)


class SuffixDecodingDrafter:
    """Suffix Decoding's drafting rules (ArcticInference, as a vLLM method), reimplemented over flat token arrays:
    a "prompt tree" over the row's own tokens and a "global tree" over the corpus and the outputs finished so far.
    For every match length 1..max_depth of the history's suffix, walk the matched node greedily down its most
    frequent children (child count / node count, multiplied along the path) while the path probability stays
    >= min_token_prob, for at most min(max_spec_tokens, max_spec_factor * match length + max_spec_offset) tokens;
    score a draft by the sum of its path probabilities and keep the best over lengths and both trees. Chains only
    (no token trees). Same interface as Drafter, so the simulator replays it alike."""

    def __init__(
        self,
        corpus: list[list[int]],
        max_spec_tokens: int = 16,
        max_depth: int = 24,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
    ) -> None:
        self.max_spec_tokens, self.max_depth = max_spec_tokens, max_depth
        self.max_spec_factor, self.max_spec_offset = max_spec_factor, max_spec_offset
        self.min_token_prob = min_token_prob
        self._outputs = [list(c) for c in corpus]
        self._global: np.ndarray | None = None

    def new_row(self, prompt_ids: list[int]) -> DraftContext:
        row = DraftContext(2)
        row.tokens = list(prompt_ids)
        return row

    def learn(self, output: list[int]) -> None:
        self._outputs.append(list(output))
        self._global = None

    def observe(self, accepted: list[int]) -> None:
        pass

    def propose(self, rows: list[DraftContext | None], limits: list[int] | None = None, *_: Any) -> list[list[int]]:
        if self._global is None:
            parts = [np.append(np.asarray(o, dtype=np.int64), -1) for o in self._outputs if o]
            self._global = np.concatenate([[-1], *parts]) if parts else np.full(1, -1, dtype=np.int64)
        drafts = []
        for n, row in enumerate(rows):
            limit = self.max_spec_tokens if limits is None else min(self.max_spec_tokens, limits[n])
            if row is None or limit <= 0:
                drafts.append([])
                continue
            history = np.asarray(row.tokens, dtype=np.int64)
            own = np.append(history, -1)  # the row's tokens; its own last position has no continuation
            best = max(self._speculate(own, history, limit), self._speculate(self._global, history, limit))
            drafts.append(best[1])
        return drafts

    def _speculate(self, tokens: np.ndarray, history: np.ndarray, limit: int) -> tuple[float, list[int]]:
        best: tuple[float, list[int]] = (0.0, [])
        ends = np.flatnonzero(tokens[:-1] == history[-1])
        length = 1
        while len(ends) and length <= self.max_depth:
            cap = min(limit, int(self.max_spec_factor * length + self.max_spec_offset))
            best = max(best, self._walk(tokens, ends, cap))
            if length == len(history):
                break
            before = ends - length
            ends = ends[(before >= 0) & (tokens[np.maximum(before, 0)] == history[-1 - length])]
            length += 1
        return best

    def _walk(self, tokens: np.ndarray, ends: np.ndarray, cap: int) -> tuple[float, list[int]]:
        draft: list[int] = []
        prob = score = 0.0
        prob = 1.0
        while len(draft) < cap and len(ends):
            nxt = tokens[ends + 1]
            values, counts = np.unique(nxt[nxt >= 0], return_counts=True)
            if len(values) == 0:
                break
            top = int(np.argmax(counts))
            p = prob * counts[top] / len(ends)
            if p < self.min_token_prob:
                break
            draft.append(int(values[top]))
            score, prob = score + p, p
            ends = ends[nxt == values[top]] + 1
        return score, draft


def greedy_outputs(model_name: str, task: Task, max_new_tokens: int, cache_dir: str) -> tuple[list[list[int]], Any]:
    """Token ids of the model's greedy outputs on the task's prompts (stop string included), cached on disk."""
    model, tokenizer = load_model(model_name)
    key = hashlib.sha256(
        json.dumps(
            [tokenizer_fingerprint(tokenizer), str(model.config.to_dict()), max_new_tokens, task.prompts]
        ).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"greedy-{task.name}-{len(task.prompts)}-{key}.json"
    if path.exists():
        return json.loads(path.read_text()), tokenizer
    # Greedy output does not depend on the drafts; prompt lookup only makes this faster.
    generator = SpeculativeGenerator(
        model, tokenizer, Drafter(None, DrafterConfig(mode=DraftMode.CONTEXT)), fast_forward=build_fast_forward(model)
    )
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=task.stop)
    outputs: list[list[int]] = []
    for i in tqdm(range(0, len(task.prompts), 8), desc=f"{task.name}: greedy outputs"):
        outputs += [r.token_ids for r in generator.generate(task.prompts[i : i + 8], params)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outputs))
    return outputs, tokenizer


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        **provenance("drafters"),
        "config": {k: v for k, v in vars(args).items() if k != "handler"},
        "tasks": {},
    }
    for name in args.task or list(BUILTIN_TASKS):
        task = load_task(name, args.n, args.seed)
        outputs, tokenizer = greedy_outputs(args.model, task, args.max_new_tokens, args.cache_dir)
        report["tasks"][name] = {"outputs": len(outputs), "tokens": sum(len(o) for o in outputs)}
    report["files"] = write_report(report, args.json_path, "Drafters on the model's greedy outputs", "")
    return report
