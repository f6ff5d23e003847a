"""The GPU check's `serve` step: `qrm serve` dynamic batching vs one text per forward pass, on the GPU.

    python3 benchmarks/gpu/serve_step.py --work DIR --out DIR [--dry-run] -- [benchmarks/serve_bench.py flags]

The model is a random-init export of Llama-3.2-1B's real shapes in bf16 (benchmarks/gpu_qlora_memory.py's
`build_backbone`: a `*ForSequenceClassification` with its tokenizer, which `qrm serve` loads as an export), so a
forward pass costs what a 1B reward model's does; `--dry-run` uses the tests' tiny random Llama export on the CPU.
benchmarks/serve_bench.py then starts both servers, sends the same OpenRLHF-style load alternately and writes
<out>/serve_<device>.json (its `summary.texts_per_s.ratio` is the batching ratio; `max_abs_reward_delta` the largest
reward difference between the two modes, which on a GPU includes bitsandbytes-free but batch-shape-dependent bf16
kernels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_export(work: Path, dry_run: bool) -> Path:
    """The export the servers load: tiny random Llama (dry run) or Llama-3.2-1B's shapes, random, bf16."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if dry_run:
        from serve_bench import tiny_export

        return tiny_export(work, "tiny")
    from gpu_qlora_memory import build_backbone

    out = work / "llama-3.2-1b-export"
    return out if (out / "config.json").is_file() else build_backbone(ROOT / "recipes" / "llama-3.2-1b", out, False)


def main(argv: list[str] | None = None) -> int:
    """Build the export, then run benchmarks/serve_bench.py on it with the flags after `--`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the export and the servers' logs")
    ap.add_argument("--out", type=Path, required=True, help="where serve_<device>.json goes")
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny random Llama export")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then benchmarks/serve_bench.py flags")
    args = ap.parse_args(argv)
    model = build_export(args.work, args.dry_run)
    import serve_bench

    flags = [f for f in args.bench if f != "--"]
    return serve_bench.main([*flags, "--model", str(model), "--work", str(args.work), "--out", str(args.out)])


if __name__ == "__main__":
    raise SystemExit(main())
