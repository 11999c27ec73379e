"""benchmarks.common.report and .machine: the command line, the machine description, the JSON + markdown writer."""

from __future__ import annotations

import json

from benchmarks.common.machine import cpu_was_shared, describe_machine, machine_line
from benchmarks.common.report import command_line, provenance, render_markdown, write_report


def test_command_line_as_started_from_the_checkout():
    argv = ["/src/benchmarks/__main__.py", "spec", "--n", "2", "--methods", "plain,tasc_mixed", "--no-cross", ", "]
    assert command_line("spec", argv) == "python -m benchmarks spec --n 2 --methods plain,tasc_mixed --no-cross ', '"
    assert command_line("ft", ["/src/benchmarks/__main__.py", "-v", "ft"]) == "python -m benchmarks -v ft"
    # called from other code: that process's command, flagged as such
    other = command_line("ft", ["/usr/bin/pytest", "-q"])
    assert other.startswith("/usr/bin/pytest -q") and "called from another program" in other


def test_cpu_was_shared():
    assert not cpu_was_shared(1.2, 2) and cpu_was_shared(1.6, 2) and cpu_was_shared(23.4, 2)
    assert not cpu_was_shared(5.0, 16)
    assert cpu_was_shared(1.0, None)  # unknown core count: one core


def test_describe_machine():
    m = describe_machine()
    for key in ("cpu", "cpus", "platform", "python", "torch", "transformers", "torch_threads", "load_average_start"):
        assert m[key] is not None, key
    assert len(m["load_average_start"]) == 3 and isinstance(m["cpu_was_shared"], bool)


def test_machine_line_says_whether_the_cpu_was_shared():
    machine = describe_machine() | {"cpu": "Test CPU", "cpus": 2, "memory_gb": 24.0}
    quiet = machine_line(machine | {"load_average_start": (0.4, 1.6, 2.2), "load_average_end": (1.9, 1.8, 2.2)})
    assert "Test CPU, 2 cores, 24 GB" in quiet and "at start 0.4, 1.6, 2.2 and at end 1.9, 1.8, 2.2" in quiet
    assert "A quiet machine" in quiet
    busy = machine_line(machine | {"load_average_start": (23.4, 20.0, 18.0)})
    assert "The 2-core CPU was shared with other work" in busy


def test_write_report_json_and_markdown_starting_with_the_command(tmp_path):
    report = {"benchmark": "demo", **provenance("demo"), "runs": [{"speedup": 1.5, "note": "£20-25"}]}
    report["command"] = "python -m benchmarks demo --n 2 --methods 'a b'"
    files = write_report(report, tmp_path / "out" / "demo_cpu.json", "Demo benchmark", "| a |\n|---|\n| 1 |\n")
    assert files == {"json": str(tmp_path / "out" / "demo_cpu.json"), "md": str(tmp_path / "out" / "demo_cpu.md")}
    data = json.loads((tmp_path / "out" / "demo_cpu.json").read_text(encoding="utf-8"))
    assert data["runs"] == [{"speedup": 1.5, "note": "£20-25"}] and data["command"] == report["command"]
    assert len(data["machine"]["load_average_end"]) == 3  # recorded when written
    md = (tmp_path / "out" / "demo_cpu.md").read_text(encoding="utf-8")
    lines = md.splitlines()
    assert lines[0] == "Command: `python -m benchmarks demo --n 2 --methods 'a b'`"
    assert lines[2] == "# Demo benchmark" and lines[4].startswith(("Commit `", "Machine: "))
    assert "Machine: " in lines[4] and "transformers" in lines[4]
    assert md.endswith("| a |\n|---|\n| 1 |\n")
    assert md == render_markdown(data, "Demo benchmark", "| a |\n|---|\n| 1 |")  # re-renders from the JSON
