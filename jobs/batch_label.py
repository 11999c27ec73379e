"""Ray job entry point for batch labeling (thin: the work is tasc_ray.labeling.label_parquet).

    ray job submit --working-dir . -- python jobs/batch_label.py --input s3://bucket/prompts.parquet \
        --output s3://bucket/labels --model smollm2-135m --index s3://bucket/index --prompt-template "{prompt}"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

try:
    import tasc_ray  # noqa: F401
except ImportError:  # run from a checkout (ray job --working-dir) without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasc_ray.label_commands import add_label_arguments, run_label  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TASC batch labeling on Ray Data",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_label_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (always logged)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_label(args)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["rows_remaining"] == 0 or args.limit is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
