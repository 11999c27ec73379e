"""`python -m benchmarks.ft_data TASK --out-dir DIR`: write a task as the parquet files the generic `bench ft` reads.

    python -m benchmarks.ft_data wikisql --out-dir benchmarks/cache/ft_data/wikisql --train-rows 2000 --eval-rows 500
    python -m benchmarks ft --train benchmarks/cache/ft_data/wikisql/train.parquet \
        --eval benchmarks/cache/ft_data/wikisql/test.parquet --train-rows 256 --eval-rows 48

Every file has a `prompt` and a `reference` column. Tasks (from the shared datasets, see
benchmarks/common/ft_tasks.py): `wikisql` (question -> SQL with its values filled in; `train.parquet` from
WikiSQL's train questions, `test.parquet` from its test questions), `e2e_text2mr` and `e2e_mr2text` (the presets
of `bench ft --direction`: `train.parquet`, `heldout.parquet`, `test.parquet`).
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.common.ft_tasks import write_task_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ft_data", description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=["wikisql", "e2e_text2mr", "e2e_mr2text"])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=500, help="rows per evaluation file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_task_files(args.task, args.out_dir, args.train_rows, args.eval_rows, args.seed)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
