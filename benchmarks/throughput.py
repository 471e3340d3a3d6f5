"""Throughput benchmark (same as ``tdpipe bench``): HF generate, HF generate_batch, tdpipe_hf 1 and 2 stages.

    python benchmarks/throughput.py --prompts ../shared/data/prompts.jsonl --num-prompts 64 \
        --max-new-tokens 128 --json out/throughput.json
"""

import sys

from tdpipe_hf.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
