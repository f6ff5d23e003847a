"""The GPU check's Python steps and its summary (run by benchmarks/gpu/run.sh).

    python3 benchmarks/gpu/check.py --preflight --out-dir DIR [--dry-run]   # imports, requirements, CUDA, bnb kernels
    python3 benchmarks/gpu/check.py --out-dir DIR [--dry-run]               # steps `memory` and `parity`, one process
    python3 benchmarks/gpu/check.py --summarize --out-dir DIR --steps-file F --planned "..." --since T

`memory`: bitsandbytes 4-bit training steps at the 8B recipe's real shapes (random init, no Hub) through
`qrm.train.build_trainer`, peak memory against `qrm plan` and MFU (benchmarks/gpu_qlora_memory.py). `parity`:
packed + prefix-shared vs TRL's padded path, flash-attn varlen packing, and the 4-bit inference kernel against the
training path (benchmarks/gpu/parity.py). The summary, gpu-check-<device>.json, reads their JSON only and lists
every planned step's status (`not run` after the first failure), so a step that failed is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPE_8B = ROOT / "recipes" / "llama-3.1-8b" / "hh_rlhf_qlora.yaml"


def run_steps(out_dir: Path, dry_run: bool, backbone_dir: Path | None = None) -> int:
    """The `memory` step (8B shapes through `qrm.train.build_trainer`) then `parity`, in this process; returns the
    first non-zero exit code."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import gpu_qlora_memory
    import parity

    flags = ["--tiny"] if dry_run else ["--steps", "8", "--max-length", "1024"]
    flags += ["--backbone-dir", str(backbone_dir)] if backbone_dir else []
    rc = gpu_qlora_memory.main([*flags, "--recipe", str(RECIPE_8B), "--out-dir", str(out_dir)])
    import gc

    import torch

    gc.collect()  # the 8B trainer is gone: give its cached blocks back before the parity models load
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rc or parity.main([*(["--dry-run"] if dry_run else []), "--out-dir", str(out_dir)])


# Imported by the steps; a failure here costs seconds instead of a step's minutes.
MODULES = (
    "qrm.train",
    "qrm.serve",
    "trl",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "fastapi",
    "uvicorn",
    "httpx",
)
# Whose declared requirements must hold in the image (wheels install with --no-deps, so pip checks nothing).
REQUIRERS = ("transformers", "trl", "peft", "datasets", "accelerate", "fastapi", "pydantic", "uvicorn")
PREFLIGHT = ".preflight.json"


def unmet_requirements(requirers: tuple[str, ...] = REQUIRERS) -> list[str]:
    """`"<dist> needs <requirement>, found <version or nothing>"` for every declared requirement of `requirers`
    (extras ignored) that the installed packages do not meet."""
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for dist in requirers:
        try:
            reqs = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            unmet.append(f"{dist} is not installed")
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                found = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{dist} needs {req}, found nothing")
                continue
            if req.specifier and not req.specifier.contains(found, prereleases=True):
                unmet.append(f"{dist} needs {req}, found {found}")
    return unmet


def preflight(out_dir: Path, dry_run: bool) -> int:
    """Seconds-long checks before any model is built: every module the steps import, the declared requirements,
    CUDA and bitsandbytes' CUDA library (a 4-bit round trip on the GPU). Writes <out_dir>/.preflight.json (merged
    into the summary) and prints one line per problem; returns 1 if there is any."""
    import importlib
    from importlib import metadata

    facts: dict[str, Any] = {"problems": []}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # an ImportError, or a library failing at import (bitsandbytes without its .so)
            facts["problems"].append(f"import {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    facts["problems"] += unmet_requirements()
    names = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "flash-attn")
    facts["versions"] = {n: _version(metadata, n) for n in names}
    import torch

    facts["cuda"] = torch.cuda.is_available()
    facts["torch_cuda"] = torch.version.cuda
    if facts["cuda"]:
        facts["device"] = torch.cuda.get_device_name()
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        facts["gpu_memory_gib"] = torch.cuda.mem_get_info()[1] / 1024**3
        facts["problems"] += _bnb_cuda_round_trip()
    elif not dry_run:
        facts["problems"].append("no CUDA device: torch.cuda.is_available() is False (use --dry-run on a CPU)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PREFLIGHT).write_text(json.dumps(facts, indent=2) + "\n")
    print(f"preflight: {facts.get('device', 'cpu')}, torch {facts['versions']['torch']} (CUDA {facts['torch_cuda']}), "
          f"flash-attn {facts['versions']['flash-attn'] or 'not installed'}")  # fmt: skip
    for problem in facts["problems"]:
        print(f"preflight: PROBLEM: {problem}")
    return int(bool(facts["problems"]))


def _version(metadata: Any, name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _bnb_cuda_round_trip() -> list[str]:
    """[] when bitsandbytes quantizes and dequantizes NF4 on the GPU within NF4's error, else the problem."""
    import torch

    try:
        import bitsandbytes.functional as F

        w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        err = (F.dequantize_4bit(packed, state) - w).abs().max().item() / w.abs().max().item()
    except Exception as e:
        return [f"bitsandbytes NF4 on CUDA: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    return [] if err < 0.2 else [f"bitsandbytes NF4 on CUDA: round-trip error {err:.3f} of the largest weight"]


def _steps(steps_file: Path | None, planned: list[str]) -> list[dict[str, Any]]:
    """Each planned step's status and seconds from run.sh's tab-separated file; steps with no line: `not run`."""
    steps = []
    if steps_file is not None and steps_file.is_file():
        for line in steps_file.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            status = "ok" if rc == "0" else ("timeout" if rc in ("124", "137") else f"failed (exit {rc})")
            steps.append({"step": name, "status": status, "seconds": int(seconds)})
    done = {s["step"] for s in steps}
    return steps + [{"step": n, "status": "not run", "seconds": 0} for n in planned if n not in done]


def summarize(
    out_dir: Path, steps_file: Path | None, planned: list[str] | None = None, since: float = 0.0
) -> dict[str, Any]:
    """Write gpu-check-<device>.json: each step's status and seconds (`not run` after the first failure), the
    preflight facts, memory vs plan, MFU, the parity and serve comparisons. Reads the JSON records the steps wrote
    in `out_dir` at or after `since` (benchmarks/results also holds other runs' records).

    Args:
        out_dir (`Path`): where the steps wrote their records.
        steps_file (`Path`, *optional*): run.sh's tab-separated step, exit code, seconds.
        planned (`list[str]`, *optional*, defaults to `None`): every step run.sh would run, in order.
        since (`float`, *optional*, defaults to `0.0`): the run's start (seconds since the epoch).

    Returns:
        `dict`: the summary written."""
    steps = _steps(steps_file, planned or [])
    pre_path = out_dir / PREFLIGHT
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    records = {
        p.name: json.loads(p.read_text())
        for p in sorted(out_dir.glob("*.json"))
        if "gpu-check" not in p.name and p.stat().st_mtime >= since
    }
    device = pre.get("device") or next((r["device"] for k, r in records.items() if k.startswith("gpu-parity-")), "cpu")
    parity = next((v for k, v in records.items() if k.startswith("gpu-parity-") and v["device"] == device), None)
    memory = {k: v for k, v in records.items() if k.startswith("llama-3.1-8b-") and v.get("device") == device}
    serve = next((v for k, v in records.items() if k.startswith("serve_")), None)
    failed = next((s for s in steps if s["status"] not in ("ok", "not run")), None)
    res: dict[str, Any] = {"device": device, "steps": steps, "stopped_at": failed and failed["step"]}
    res["preflight"] = pre
    res["runs"] = {name: _run_summary(rec) for name, rec in memory.items()}
    if parity is not None:
        keys = ("packed_prefix_shared_vs_trl_padded", "varlen_packing_vs_trl_padded", "inference_vs_training_4bit_path")
        res["parity"] = {k: parity.get(k) for k in keys}
    if serve is not None:
        res["serve"] = {"device": serve["device"], "load": serve["load"], "summary": serve["summary"]}
    slug = "".join(c if c.isalnum() else "-" for c in device.lower())
    (out_dir / f"gpu-check-{slug}.json").write_text(json.dumps(res, indent=2) + "\n")
    _print_summary(res, out_dir / f"gpu-check-{slug}.json")
    return res


def _run_summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The summary's line for one memory record (benchmarks/gpu_qlora_memory.py)."""
    return {
        "launch": rec["launch"],
        "train_loss": rec["train_loss"],
        "tokens_per_s": rec["timing"].get("tokens_per_s"),
        "memory_vs_plan": rec["comparison"],
        "oom": rec["memory_gib"].get("oom"),
        "sharding": rec["memory_gib"].get("sharding"),
        **rec.get("mfu", {}),
    }


def _print_summary(res: dict[str, Any], path: Path) -> None:
    for s in res["steps"]:
        print(f"step {s['step']:<14} {s['status']:<18} {s['seconds']:>5} s")
    for name, run in res["runs"].items():
        m = "-" if run.get("mfu") is None else f"{run['mfu']:.1%}"
        print(f"{name}: {run['launch']}, tokens/s {run['tokens_per_s'] or '-'}, MFU {m}")
    if "serve" in res:
        ratio = res["serve"]["summary"]["texts_per_s"]["ratio"]
        print(f"serve on {res['serve']['device']}: dynamic / one-at-a-time texts/s {ratio:.2f}x")
    if res["stopped_at"]:
        print(f"STOPPED at step {res['stopped_at']}: the steps after it did not run")
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`--preflight`, the memory and parity steps, or `--summarize` (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--preflight", action="store_true", help="imports, requirements, CUDA and bitsandbytes' kernels")
    ap.add_argument("--backbone-dir", type=Path, default=None, help="the 8B random backbone, built once (kept)")
    ap.add_argument("--summarize", action="store_true", help="write the summary of the runs in --out-dir")
    ap.add_argument("--steps-file", type=Path, default=None, help="tab-separated step, exit code, seconds")
    ap.add_argument("--planned", default="", help="space-separated step names run.sh plans to run")
    ap.add_argument("--since", type=float, default=0.0, help="read records written at or after this epoch time")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.preflight:
        return preflight(args.out_dir, args.dry_run)
    if args.summarize:
        res = summarize(args.out_dir, args.steps_file, args.planned.split(), args.since)
        (args.out_dir / PREFLIGHT).unlink(missing_ok=True)
        return int(any(s["status"] != "ok" for s in res["steps"]))
    return run_steps(args.out_dir, args.dry_run, args.backbone_dir)


if __name__ == "__main__":
    raise SystemExit(main())
