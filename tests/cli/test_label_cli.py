"""`tasc-ray label` fails cleanly: an output it cannot write and an S3 input or output it cannot reach are one line
on stderr naming the path (bucket, key, reason) and exit code 2, before any model is loaded or row decoded."""

from __future__ import annotations

import json

import pytest

from tasc_ray.cli.main import main

NO_MODEL = "/nonexistent/model"  # never loaded: every check here comes first


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "Sentence: a pub.\nMR:"}) + "\n")
    return path


def _label(input: str, output: str) -> list[str]:
    return ["label", "--input", input, "--output", output, "--model", NO_MODEL]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("tasc-ray label: error: ")
    return err[0]


def test_output_under_a_regular_file(tmp_path, prompts, capsys):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a directory")
    assert main(_label(str(prompts), str(blocker / "out"))) == 2
    assert f"{blocker}/out: {blocker} is a file, not a directory" in _one_line_error(capsys)
    assert blocker.read_text() == "not a directory"


def test_output_that_is_a_file(tmp_path, prompts, capsys):
    assert main(_label(str(prompts), str(prompts))) == 2
    assert "exists and is not a directory" in _one_line_error(capsys)


def test_missing_s3_buckets_are_named(tmp_path, prompts, s3_server, s3_bucket, capsys):
    assert main(_label("s3://nosuchbucket-cli/in", str(tmp_path / "out"))) == 2
    line = _one_line_error(capsys)
    assert (
        "cannot read input: s3://nosuchbucket-cli/in: bucket 'nosuchbucket-cli' does not exist (NoSuchBucket)" in line
    )
    assert not (tmp_path / "out").exists()

    assert main(_label(f"s3://{s3_bucket}/in/prompts.jsonl", str(tmp_path / "out"))) == 2
    assert f"no such key 'in/prompts.jsonl' in bucket '{s3_bucket}'" in _one_line_error(capsys)

    assert main(_label(str(prompts), "s3://nosuchbucket-cli/out")) == 2
    line = _one_line_error(capsys)
    assert "cannot write output: s3://nosuchbucket-cli/out: bucket 'nosuchbucket-cli' does not exist" in line


def test_kept_columns_are_checked_before_any_model_loads(tmp_path, prompts, capsys):
    out = str(tmp_path / "out")
    assert main([*_label(str(prompts), out), "--keep-columns", "prompt,output"]) == 2
    assert "cannot keep input column(s) ['output']" in _one_line_error(capsys)
    assert main([*_label(str(prompts), out), "--keep-columns", "prompt, source"]) == 2
    assert "source" in _one_line_error(capsys)
