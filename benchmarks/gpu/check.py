"""The GPU check's Python steps, in one process (one import of torch/transformers/TRL), and its summary.

    python3 benchmarks/gpu/check.py --out-dir DIR [--dry-run]     # steps `memory` and `parity`
    python3 benchmarks/gpu/check.py --summarize --out-dir DIR     # after the FSDP launch: gpu-check-<device>.json

`memory`: bitsandbytes 4-bit training steps at the 8B recipe's real shapes (random init, no Hub) through
`qrm.train.build_trainer`, peak memory against `qrm plan` (benchmarks/gpu_qlora_memory.py). `parity`: packed +
prefix-shared vs TRL's padded path and flash-attn varlen packing (benchmarks/gpu/parity.py). The summary reads
their JSON only (MFU comes with each memory record) and lists every step's status, so a step that failed or ran out
of time is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPE_8B = ROOT / "recipes" / "llama-3.1-8b" / "hh_rlhf_qlora.yaml"


def run_steps(out_dir: Path, dry_run: bool) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import gpu_qlora_memory
    import parity

    flags = ["--tiny"] if dry_run else ["--steps", "12"]
    rc = gpu_qlora_memory.main([*flags, "--recipe", str(RECIPE_8B), "--out-dir", str(out_dir)])
    import gc

    import torch

    gc.collect()  # the 8B trainer is gone: give its cached blocks back before the parity models load
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rc or parity.main([*(["--dry-run"] if dry_run else []), "--out-dir", str(out_dir)])


def summarize(out_dir: Path, steps_file: Path | None) -> dict[str, Any]:
    """gpu-check-<device>.json: each step's status and seconds, memory vs plan, speed ratios, MFU."""
    steps = []
    if steps_file is not None and steps_file.is_file():
        for line in steps_file.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            status = "ok" if rc == "0" else ("timeout" if rc in ("124", "137") else f"failed (exit {rc})")
            steps.append({"step": name, "status": status, "seconds": int(seconds)})
    records = {p.name: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if "gpu-check" not in p.name}
    # benchmarks/results also holds other machines' records: keep this device's
    device = next((r["device"] for k, r in records.items() if k.startswith("gpu-parity-")), None)
    device = device or next((r["device"] for r in records.values() if "device" in r), "unknown")
    parity = next((v for k, v in records.items() if k.startswith("gpu-parity-") and v["device"] == device), None)
    memory = {k: v for k, v in records.items() if k.startswith("llama-3.1-8b-") and v.get("device") == device}
    res: dict[str, Any] = {"device": device, "steps": steps, "runs": {}}
    for name, rec in memory.items():
        res["runs"][name] = {
            "launch": rec["launch"],
            "train_loss": rec["train_loss"],
            "tokens_per_s": rec["timing"].get("tokens_per_s"),
            "memory_vs_plan": rec["comparison"],
            "oom": rec["memory_gib"].get("oom"),
            **rec.get("mfu", {}),
        }
    if parity is not None:
        res["parity"] = {k: parity[k] for k in ("packed_prefix_shared_vs_trl_padded", "varlen_packing_vs_trl_padded")}
    slug = "".join(c if c.isalnum() else "-" for c in device.lower())
    (out_dir / f"gpu-check-{slug}.json").write_text(json.dumps(res, indent=2) + "\n")
    for s in steps:
        print(f"step {s['step']:<8} {s['status']:<18} {s['seconds']:>5} s")
    for name, run in res["runs"].items():
        m = "-" if run.get("mfu") is None else f"{run['mfu']:.1%}"
        print(f"{name}: {run['launch']}, tokens/s {run['tokens_per_s'] or '-'}, MFU {m}")
    print(f"wrote {out_dir / f'gpu-check-{slug}.json'}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--summarize", action="store_true", help="write the summary of the runs in --out-dir")
    ap.add_argument("--steps-file", type=Path, default=None, help="tab-separated step, exit code, seconds")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.summarize:
        return int(any(s["status"] != "ok" for s in summarize(args.out_dir, args.steps_file)["steps"]))
    return run_steps(args.out_dir, args.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
