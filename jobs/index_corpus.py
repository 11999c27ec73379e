"""Ray job: index a corpus of outputs (parquet on local disk or S3) into an n-gram index.

    ray job submit --working-dir . -- python jobs/index_corpus.py --input s3://bucket/outputs/ \
        --column output --tokenizer smollm2-135m --out s3://bucket/index/

Same arguments as `tasc-ray index`; connects to the cluster at RAY_ADDRESS (set by `ray job submit`), or starts
a local Ray. A thin entry point: all the work is in tasc_ray.distributed_index.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tasc_ray.cli import USER_ERRORS
from tasc_ray.index_commands import add_index_arguments, run_index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_index_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        summary = run_index(args)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"index_corpus: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
