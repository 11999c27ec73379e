"""The harnesses' command line (`python -m benchmarks NAME --help`), the library names they import (also inside
functions, so a moved name fails here and not in the middle of a long run), and their pure steps."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import BENCH_MODULES
from tasc_ray.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
NAMES = ("spec", "ft", "label", "serve", "index")


def test_top_level_help_lists_every_benchmark():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("usage: python -m benchmarks") and all(f"    {n} " in out for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_benchmark_has_help(name, capsys):
    parser = build_parser("python -m benchmarks", BENCH_MODULES)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks {name} ")


def test_the_parser_needs_no_ray():
    """gpu_check.sh runs `python -m benchmarks spec` on a machine without Ray: registering the benchmarks imports
    neither Ray nor what only some harnesses use."""
    code = (
        "import sys; from benchmarks import BENCH_MODULES; from tasc_ray.cli.main import build_parser; "
        "build_parser('x', BENCH_MODULES); print(sorted({'ray', 'psutil', 'pandas', 'sacrebleu'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _project_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every `from tasc_ray/serve_apps/benchmarks... import name` in benchmarks/."""
    found = []
    for path in sorted(BENCH.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
                found += [(str(path.relative_to(ROOT)), node.module, alias.name) for alias in node.names]
    return found


PROJECT = {"tasc_ray", "serve_apps", "benchmarks"}


def test_every_imported_library_name_exists():
    missing = []
    for path, module, name in _project_imports():
        try:
            ok = hasattr(importlib.import_module(module), name) or importlib.util.find_spec(f"{module}.{name}")
        except ImportError:
            ok = False
        if not ok:
            missing.append(f"{path}: from {module} import {name}")
    assert not missing, "\n".join(missing)


def test_commands_say_python_m_benchmarks():
    for path in [*BENCH.rglob("*.py"), BENCH / "gpu_check.sh"]:
        text = path.read_text()
        assert "tasc-ray bench" not in text and "benchmarks.spec " not in text, path
    for module in BENCH_MODULES:
        assert "`python -m benchmarks " in importlib.import_module(module).__doc__


def test_serve_percentiles_and_merged_segments():
    from benchmarks.serve import _merge, _percentile

    assert _percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0 and _percentile([1.0, 2.0, 3.0], 0.99) == 3.0
    usage = {"completion_tokens": 10, "drafted_tokens": 4, "accepted_tokens": 2, "forward_passes": 5, "errors": 0}
    segments = [
        {"requests": 2, "seconds": 1.0, "latencies": [0.5, 0.4], "texts": ["a", "b"], **usage},
        {"requests": 2, "seconds": 3.0, "latencies": [1.0, 2.0], "texts": ["c", None], **usage},
    ]
    merged = _merge(segments)
    assert merged["requests_per_s"] == 1.0 and merged["tokens_per_s"] == 5.0 and merged["p50_s"] == 1.0
    assert merged["accepted_per_pass"] == 0.4 and merged["texts"] == ["a", "b", "c", None]


def test_index_targets_use_the_median_runs():
    from benchmarks.index import median_run, targets_of

    def ray(corpus, workers, seconds, kind="timed"):
        return {
            "builder": "ray_data",
            "kind": kind,
            "corpus": corpus,
            "workers": workers,
            "seconds": seconds,
            "tokens": 600_000,
            "tokens_per_s": 600_000 / seconds,
            "map_seconds": seconds - 0.5,
            "first_block_seconds": 0.5,
            "reducer_peak_rss_mb": seconds,
            "map_worker_peak_rss_mb": 2 * seconds,
        }

    runs = [ray("small", 2, 9.0, "warm-up"), ray("big", 2, 1.0), ray("big", 1, 3.0), ray("big", 2, 2.0)]
    runs += [ray("big", 1, 2.0), ray("big", 2, 30.0), ray("big", 1, 4.0), ray("small", 2, 1.5)]
    for corpus, rss in (("big", 900), ("small", 500)):
        runs.append({"builder": "in_process", "corpus": corpus, "workers": 1, "tokens_per_s": 1e5, "peak_rss_mb": rss})
    assert median_run(runs, "big", 2)["seconds"] == 2.0 and median_run(runs, "big", 1)["seconds"] == 3.0
    t = targets_of(runs)
    assert t["throughput_2_workers_tokens_per_s"] == 300_000 and t["throughput_target_300k_met"]
    assert t["scaling_1_to_2_workers"] == 1.5 and t["scaling_target_1_5x_met"]
    assert t["after_first_block_tokens_per_s"] == {2: 600_000 / 1.0, 1: 600_000 / 2.0}
    assert t["reducer_peak_rss_mb_small_vs_big"] == [1.5, 2.0]
    assert t["in_process_peak_rss_mb_small_vs_big"] == [500, 900]


@pytest.mark.parametrize(
    "result, render, expected",
    [
        ("spec_cpu.json", "spec", "| e2e_text2mr | tasc_mixed | reference | 1 | 56.60 | 1.75x |"),
        ("ft_text2mr_cpu_splits.json", "ft", "## Targets (compression and speed on `heldout`)"),
        ("label_e2e.json", "label", "Speedup (TASC-spec / plain): **1.82x rows/s**"),
        ("serve_e2e.json", "serve", "| 8 | tasc | 16 |"),
    ],
)
def test_committed_results_render_again(result, render, expected):
    """The renderers read the committed results' JSON (the shapes later work relies on) and give their tables."""
    path = RESULTS / result
    if not path.is_file():
        pytest.skip(f"{result} is not committed")
    r = json.loads(path.read_text())
    from benchmarks import ft, serve, spec

    body = {
        "spec": lambda: spec.markdown_table(r),
        "ft": lambda: ft.markdown(r),
        "label": lambda: serve._label_table(r),
        "serve": lambda: serve._serve_table(r["levels"]),
    }[render]()
    assert expected in body and body in path.with_suffix(".md").read_text()
