"""Ray job: index a corpus of outputs on Ray Data, the same arguments as `tasc-ray index` (prints the JSON summary).

    ray job submit --working-dir . -- python jobs/index_corpus.py --input s3://bucket/outputs/ \
        --column output --tokenizer smollm2-135m --out s3://bucket/index/

Connects to the cluster in RAY_ADDRESS (set by `ray job submit`), else starts a local Ray.
"""

import sys

from tasc_ray.cli.main import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["index", "--json", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
