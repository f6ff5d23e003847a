"""Benchmark qrm against TRL's RewardTrainer with its defaults: same backbone, data, batch and machine, one run.

    python scripts/benchmark.py --backbone tiny-llama --profile hh synthetic        # CPU, a few minutes each
    python scripts/benchmark.py --backbone minilm --profile hh
    python scripts/benchmark.py --device cuda --backbone llama-3.1-8b --profile hh synthetic --compare-bf16
    python scripts/benchmark.py --table-only --readme-table                          # rebuild the results table

Same code path as `qrm bench` (qrm/bench.py, where the definitions are); results go to benchmarks/results/.
On the lent GPU machine, install the wheels that benchmarks/gpu_qlora_memory.py's docstring lists first; for the
issue's 8B-at-2k MFU goal add `--profile synthetic --synthetic-prompt-tokens 1900 2000`.
"""

import sys


def main() -> int:
    from qrm.cli import run  # one handler for every command, as `qrm bench`

    return run("bench", sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
