"""The one report writer: every benchmark writes `<name>.json` and `<name>.md`, both recording the exact command
that produced them (the markdown's first line), the git commit and the machine (common/machine.py)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from benchmarks.common.machine import describe_machine, git_commit, machine_line

logger = logging.getLogger(__name__)


def command_line(name: str, argv: list[str] | None = None) -> str:
    """This process's command as `python -m benchmarks NAME ...` (options shell-quoted); a benchmark called from
    other code (a test) records the command of that process instead, and says so."""
    argv = list(sys.argv if argv is None else argv)
    entry = Path(argv[0]) if argv else Path()
    if entry.name == "__main__.py" and entry.parent.name == "benchmarks":
        return shlex.join(["python", "-m", "benchmarks", *argv[1:]])
    return f"{shlex.join(argv)} (benchmark {name} called from another program)"


def provenance(name: str) -> dict[str, Any]:
    """The `command`, `git_commit` and `machine` fields every result starts with (taken as the run starts)."""
    return {"command": command_line(name), "git_commit": git_commit(), "machine": describe_machine()}


def render_markdown(report: dict[str, Any], title: str, body: str) -> str:
    """The result's markdown: the command first, then the title, the commit and machine, and `body`."""
    commit = report.get("git_commit")
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"# {title}",
        "",
        (f"Commit `{commit[:12]}`. " if commit else "") + machine_line(report["machine"]),
        "",
        body.rstrip("\n"),
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], json_path: str | Path, title: str, body: str) -> dict[str, str]:
    """Write `report` as JSON at json_path and its markdown next to it (same stem, .md); the machine's end load
    average is recorded now. Returns both paths."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report["machine"].setdefault("load_average_end", os.getloadavg())
    md_path = json_path.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report, title, body), encoding="utf-8")
    logger.info("wrote %s and %s", json_path, md_path)
    return {"json": str(json_path), "md": str(md_path)}
