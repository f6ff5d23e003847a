"""What `python -m benchmarks.trl_vs_qrm` makes of its trials: machine info, per-side medians and paired ratios, the
Markdown table and benchmarks/results/README.md.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

from benchmarks.trl_vs_qrm_trial import NO4BIT, SIDES

SCHEMA = 1
KIND = "qrm-vs-trl"  # marks this benchmark's JSON among others in benchmarks/results


def slug(text: str) -> str:
    """`text` lower-cased, every run of other characters than a-z and 0-9 turned into one `-`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info(device_name: str | None, versions: dict[str, str] | None = None) -> dict[str, Any]:
    """CPU model, cores and memory of this machine, the GPU's name when one ran the trials, library versions (as the
    trials reported them: the parent process does not import the training stack)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gib": mem, "gpu": device_name, "versions": versions or {}}


def device_slug(device: str, info: dict[str, Any]) -> str:
    """The GPU's name, or cpu-<model>-<cores>c, as a file-name slug."""
    if device == "cuda" and info.get("gpu"):
        return slug(info["gpu"])
    return f"cpu-{slug(info['cpu'])}-{info['cores']}c"


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


SUMMARY_KEYS = (
    "pairs_per_s",
    "real_tokens_per_s",
    "computed_per_unique",
    "peak_memory_mib",
    "seconds",
    "cpu_seconds",
    "mfu",
)


def by_side(trials: list[dict[str, Any]], side: str) -> list[dict[str, Any]]:
    """The trials of one side, in repeat order."""
    return sorted((t for t in trials if t["side"] == side), key=lambda t: t["repeat"])


def summarize(trials: list[dict[str, Any]], sides: list[str]) -> dict[str, Any]:
    """Per-side medians over repeats, and paired per-repeat ratios (qrm / TRL) with their median."""
    by = {s: by_side(trials, s) for s in sides}
    out: dict[str, Any] = {s: {k: _median([t.get(k) for t in by[s]]) for k in SUMMARY_KEYS} for s in sides}

    def ratios(num: str, den: str, key: str) -> float | None:
        pairs = zip(by[num], by[den], strict=False)
        return _median([a[key] / b[key] if a.get(key) and b.get(key) else None for a, b in pairs])

    out["ratios"] = {k: ratios("qrm", "trl", k) for k in SUMMARY_KEYS}
    if NO4BIT in sides:
        out["qlora_over_no4bit_seconds"] = ratios("qrm", NO4BIT, "seconds")
    # qrm's targets for the HH-helpful profile (>= 3x TRL's pairs/s, <= 2 % wasted tokens); recorded for every
    # profile, judged by the reader.
    speedup, waste = out["ratios"]["pairs_per_s"], out["qrm"]["computed_per_unique"]
    out["goals"] = {
        "pairs_per_s_ratio_at_least_3": None if speedup is None else speedup >= 3.0,
        "qrm_computed_per_unique_at_most_1.02": None if waste is None else waste <= 1.02,
    }
    return out


def check_same(trials: list[dict[str, Any]]) -> list[str]:
    """Everything that must be equal across sides for the comparison to mean what it says; returns warnings."""
    problems = []
    prints = {t["data"]["fingerprint"] for t in trials}
    if len(prints) != 1:
        raise RuntimeError(f"trials trained on different pairs (fingerprints {sorted(prints)})")
    for key in ("bf16", "trainable_dtypes"):  # attention may differ: qrm registers its own kernel for packing
        seen = {json.dumps(t[key]) for t in trials if t["side"] in SIDES}
        if len(seen) > 1:
            problems.append(f"{key} differs between TRL and qrm: {sorted(seen)}")
    return problems


# ----------------------------------------------------------------------------------------------- tables


def fmt_number(v: float | None, digits: int = 3) -> str:
    """`digits` significant digits, thousands separators from 100 up, "–" for None."""
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def table_rows(record: dict[str, Any]) -> str:
    """One Markdown table row per JSON record: TRL → qrm (qrm ÷ TRL) for each measure."""
    s, st = record["summary"], record["settings"]
    trl, qrm, ratio = s["trl"], s["qrm"], s["ratios"]

    def cell(key: str, digits: int = 3, with_ratio: bool = True) -> str:
        text = f"{fmt_number(trl[key], digits)} → {fmt_number(qrm[key], digits)}"
        return text + (f" ({fmt_number(ratio[key])}×)" if with_ratio and ratio.get(key) else "")

    mfu = "–"
    if qrm.get("mfu") is not None:
        mfu = f"{100 * trl['mfu']:.1f} % → {100 * qrm['mfu']:.1f} %"
    gpu = record["machine"].get("gpu")
    machine = gpu or f"{record['machine']['cpu']}, {record['machine']['cores']} cores"
    cols = [
        machine,
        record["backbone"]["name"],
        record["profile"]["name"],
        f"{st['batch_size']} × {st['max_length']}",
        f"{st['steps']} × {st['repeats']}",
        cell("pairs_per_s"),
        cell("real_tokens_per_s"),
        cell("computed_per_unique", with_ratio=False),
        cell("peak_memory_mib"),
        mfu,
    ]
    return "| " + " | ".join(cols) + " |"


TABLE_HEAD = (
    "| machine | backbone | data | batch × max_length | steps × repeats | pairs/s TRL → qrm | real tokens/s TRL → qrm "
    "| computed ÷ unique tokens | peak memory MiB | MFU |\n|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The results table: header and one row per record."""
    return "\n".join([TABLE_HEAD, *(table_rows(r) for r in records)])


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    """This benchmark's JSON records in `out_dir` (other benchmarks write there too)."""
    records = []
    for p in sorted(out_dir.glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("benchmark") == KIND and rec.get("schema") == SCHEMA:
            records.append(rec)
    return records


def write_readme(out_dir: Path) -> Path:
    """benchmarks/results/README.md: the table over every JSON record in `out_dir`, with the definitions."""
    records = load_records(out_dir)
    compare = [
        f"- {r['machine'].get('gpu') or r['machine']['cpu']}, {r['backbone']['name']}, {r['profile']['name']}: "
        f"{fmt_number(r['summary']['qlora_over_no4bit_seconds'])}"
        for r in records
        if r["summary"].get("qlora_over_no4bit_seconds")
    ]
    if compare:
        compare.insert(
            0, "\nqrm's time per epoch, QLoRA ÷ 16-bit LoRA without 4-bit on the same shapes (--compare-bf16):\n"
        )
    text = f"""# qrm vs TRL RewardTrainer: measured results

Generated by `python -m benchmarks.trl_vs_qrm --readme-table` from the JSON files in this directory (one per
device, backbone and data profile); do not edit by hand. Each cell is the median over repeats, TRL's
`RewardTrainer` with its defaults → qrm with its recipe defaults, and (×) the median of the paired per-repeat
ratios qrm ÷ TRL.

{markdown_table(records)}
{chr(10).join(compare)}

- Same backbone (4-bit NF4 + LoRA r 16 on all linear layers, trainable score head), same tokenized pairs, batch
  size, max_length, learning rate, seed and precision on both sides; each trial in its own process.
- pairs/s and real tokens/s: over one timed epoch of steps × batch pairs after warm-up steps; real tokens of a pair
  = chosen + rejected − prompt (the shared prompt counted once).
- computed ÷ unique tokens: `input_ids.numel()` of every batch fed to the model ÷ real tokens (TRL pads and
  computes the prompt twice; 1.0 = no waste).
- peak memory: the trial process's `ru_maxrss` on CPU (model loading included), `torch.cuda.max_memory_allocated`
  on GPU.
- MFU (GPU only): real tokens/s × (4·N_linear + 6·N_lora + 3·L·d_attn·s) ÷ the GPU's dense bf16 peak
  (`benchmarks/trl_vs_qrm_trial.py` PEAK_BF16_FLOPS), s = mean sequence length.
- CPU trials use one torch thread (`--threads`): on a shared 2-core machine, two OpenMP threads ran 10–30× slower
  whenever another process held a core, which would swamp the comparison. The JSON files also hold each trial's
  CPU seconds and load average, the per-step times and the machine's library versions.

Reproduce, from the checkout root: `python -m benchmarks.trl_vs_qrm --backbone tiny-llama --profile hh synthetic`
and `python -m benchmarks.trl_vs_qrm --backbone minilm --profile hh` (CPU);
`python -m benchmarks.trl_vs_qrm --device cuda --backbone llama-3.1-8b --profile hh synthetic --compare-bf16` (GPU;
add `--synthetic-prompt-tokens 1900 2000` for sequences near the 2k context).
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path
