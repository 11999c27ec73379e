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
- ours: chains from the corpus and the context (suffix matches of any length, acceptance calibrated online by
  source, match length and depth); with live learning of finished outputs; with token trees (the default
  configuration). The earlier variants (raw frequencies, orders <= 4 only, lambda mixing, prompt grounding) were
  measured in the committed drafters_sim results and removed from the engine; git history has them.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.common.report import provenance, write_report
from benchmarks.common.tasks import BUILTIN_TASKS, Task, load_task
from tasc_ray.cli.args import add_model_argument
from tasc_ray.engine.config import DrafterConfig, DraftMode
from tasc_ray.engine.cost import StepCostTable
from tasc_ray.engine.drafts.drafter import DraftContext, Drafter
from tasc_ray.engine.drafts.index import NgramIndex, tokenize_texts, tokenizer_fingerprint
from tasc_ray.engine.drafts.tree import DraftTree
from tasc_ray.engine.generator import SamplingParams, SpeculativeGenerator
from tasc_ray.engine.model.fast_forward import build_fast_forward
from tasc_ray.engine.simulate import simulate_acceptance
from tasc_ray.models import load_model


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
    p.add_argument(
        "--step-costs", default="benchmarks/results/spec_cpu.json", help="bench spec results with a batch-1 cost table"
    )
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
        self.config = DrafterConfig(
            mode=DraftMode.CONTEXT, max_draft=max_spec_tokens, tree_nodes=0
        )  # the simulator reads
        self._outputs = [list(c) for c in corpus]
        self._global: np.ndarray | None = None

    def new_row(self, prompt_ids: list[int]) -> DraftContext:
        row = DraftContext()
        row.tokens = list(prompt_ids)
        return row

    def learn(self, output: list[int]) -> None:
        self._outputs.append(list(output))
        self._global = None

    def observe(self, trees: list[DraftTree], paths: list[list[int]]) -> None:
        pass

    def propose(
        self, rows: list[DraftContext | None], limits: list[int] | None = None, branching: bool = False
    ) -> list[DraftTree]:
        if self._global is None:
            parts = [np.append(np.asarray(o, dtype=np.int64), -1) for o in self._outputs if o]
            self._global = np.concatenate([[-1], *parts]) if parts else np.full(1, -1, dtype=np.int64)
        drafts = []
        for n, row in enumerate(rows):
            limit = self.max_spec_tokens if limits is None else min(self.max_spec_tokens, limits[n])
            if row is None or limit <= 0:
                drafts.append(DraftTree())
                continue
            history = np.asarray(row.tokens, dtype=np.int64)
            own = np.append(history, -1)  # the row's tokens; its own last position has no continuation
            best = max(self._speculate(own, history, limit), self._speculate(self._global, history, limit))
            drafts.append(DraftTree.chain(best[1]))  # no scores: verified whole, as Suffix Decoding does
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


def greedy_outputs(model, tokenizer, task: Task, max_new_tokens: int, cache_dir: str) -> list[list[int]]:
    """Token ids of the model's greedy outputs on the task's prompts (stop string included), cached on disk."""
    key = hashlib.sha256(
        json.dumps(
            [tokenizer_fingerprint(tokenizer), str(model.config.to_dict()), max_new_tokens, task.prompts]
        ).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"greedy-{task.name}-{len(task.prompts)}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
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
    return outputs


def drafters(corpus: list[list[int]]) -> dict[str, Any]:
    """Every drafter of the table: a DrafterConfig, or a Suffix Decoding drafter (built fresh for each replay)."""
    return {
        "prompt lookup (context only, chains)": DrafterConfig(mode=DraftMode.CONTEXT, max_draft=16, tree_nodes=0),
        "Suffix Decoding (chain, 16 tokens)": lambda: SuffixDecodingDrafter(corpus),
        "Suffix Decoding (chain, 16 tokens, max_spec_factor 2)": lambda: SuffixDecodingDrafter(
            corpus, max_spec_factor=2
        ),
        "ours: corpus + context, chains, k=8": DrafterConfig(max_draft=8, live_outputs=0, tree_nodes=0),
        "ours: corpus + context, chains": DrafterConfig(max_draft=16, live_outputs=0, tree_nodes=0),
        "+ live learning (chains)": DrafterConfig(max_draft=16, tree_nodes=0),
        "+ token trees (16 nodes): the default": DrafterConfig(max_draft=16, tree_nodes=16),
        "+ token trees, min_path_prob 0.3": DrafterConfig(max_draft=16, tree_nodes=16, min_path_prob=0.3),
    }


def cpu_step_costs(path: str) -> StepCostTable | None:
    """Batch-1 pass costs by query tokens as `bench spec` measured them on this CPU (its results file), if any."""
    try:
        ms = json.loads(Path(path).read_text())["cost_table"]["ms"]["1"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    table = StepCostTable()
    for q, value in ms.items():
        table.set(1, int(q), value / 1000)
    return table


def run(args: argparse.Namespace) -> dict[str, Any]:
    costs = cpu_step_costs(args.step_costs)
    model, tokenizer = load_model(args.model)  # once: each task's cached outputs are keyed by its config
    report: dict[str, Any] = {
        **provenance("drafters"),
        "config": {k: v for k, v in vars(args).items() if k != "handler"},
        "step_costs": costs.table() if costs is not None else None,
        "tasks": {},
    }
    for name in args.task or list(BUILTIN_TASKS):
        task = load_task(name, args.n, args.seed)
        outputs = greedy_outputs(model, tokenizer, task, args.max_new_tokens, args.cache_dir)
        prompts = [tokenizer(p)["input_ids"] for p in task.prompts]
        corpus = [s.tolist() for s in tokenize_texts(task.corpus, tokenizer)]
        index = NgramIndex.build(corpus, tokenizer=tokenizer)
        rows: dict[str, Any] = {}
        for label, make in drafters(corpus).items():
            config = make if isinstance(make, DrafterConfig) else DrafterConfig(max_draft=16)
            cells = {}
            for cut, step_cost in (("uncut", None), ("cpu_cut", costs)):
                if cut == "cpu_cut" and (step_cost is None or not isinstance(make, DrafterConfig)):
                    continue
                drafter = None if isinstance(make, DrafterConfig) else make()
                sim = simulate_acceptance(
                    index,
                    outputs,
                    config,
                    prompts,
                    batch_size=1,
                    drafter=drafter,
                    step_cost=copy.deepcopy(step_cost),
                )
                cells[cut] = {k: sim[k] for k in ("tokens_per_pass", "verified_per_pass", "acceptance_rate")}
                cells[cut]["draft_ms_per_pass"] = sim["draft_ms_per_pass"]
            rows[label] = cells
        report["tasks"][name] = {"outputs": len(outputs), "tokens": sum(len(o) for o in outputs), "drafters": rows}
    report["files"] = write_report(report, args.json_path, TITLE, markdown(report))
    return report


TITLE = "Drafters side by side on the model's greedy outputs (simulator, batch 1)"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "Tokens per pass (the model's own token included) and draft tokens verified per pass; `CPU cut`: drafts cut "
        "where expected tokens per second is highest on this CPU's measured batch-1 pass costs, as the engine does.",
        "",
        "| task | drafter | tokens/pass | verified/pass | tokens/pass, CPU cut | verified/pass, CPU cut |",
        "|---|---|---|---|---|---|",
    ]
    for name, task in report["tasks"].items():
        for label, cells in task["drafters"].items():
            uncut, cut = cells["uncut"], cells.get("cpu_cut")
            cut_cells = f"{cut['tokens_per_pass']:.3f} | {cut['verified_per_pass']:.2f}" if cut else "- | -"
            uncut_cells = f"{uncut['tokens_per_pass']:.3f} | {uncut['verified_per_pass']:.2f}"
            lines.append(f"| {name} | {label} | {uncut_cells} | {cut_cells} |")
    return "\n".join(lines) + "\n"
