"""One trial of `python -m benchmarks.trl_vs_qrm` (definitions in that module's docstring), run in its own process
so that peak memory is the trial's own: build one side (TRL's RewardTrainer with its defaults, or qrm's trainer),
train the warm-up steps, time one epoch over the pairs and count the tokens its collator produced.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor-core peak per GPU, NVIDIA datasheets; first substring of the device name wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)

SIDES = ("trl", "qrm")
NO4BIT = "qrm_no4bit"  # --compare-bf16: qrm with 16-bit LoRA, no 4-bit (bf16 base on CUDA)
HH_TRAIN = ROOT / "data" / "hh-rlhf-helpful" / "helpful-base.train.jsonl"


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
    from transformers import AutoConfig

    from qrm.model import meta_model
    from qrm.source import resolve_path

    config = AutoConfig.from_pretrained(resolve_path(model_path))
    model = meta_model(config)
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
    """Training FLOPs per real token, 4 N_linear + 6 N_lora + 3 L d_attn s (derivation in the module docstring)."""
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

    from qrm import data as qdata
    from qrm.model import cast_trainables, load_model, load_tokenizer, trainable_dtype

    set_seed(targs.seed)
    tok = load_tokenizer(margs)
    rows = qdata.prepare(dargs, tok, targs.max_length).train[:n_pairs]
    if len(rows) < n_pairs:
        raise RuntimeError(f"only {len(rows)} pairs after preparation, {n_pairs} needed: raise max_length")
    checkpointing = bool(targs.activation_checkpointing)
    model = load_model(margs, largs, tok, gradient_checkpointing=checkpointing)
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
    dtype = trainable_dtype(margs)
    if dtype is not None:
        # What qrm's build_trainer does with an fp32 compute dtype: undo TRL's bf16 cast of LoRA and head, so both
        # sides compute in the same precision and only the data layout differs.
        cast_trainables(trainer.model, dtype)
    return trainer, rows


def _qrm_trainer(margs: Any, largs: Any, dargs: Any, targs: Any, n_pairs: int) -> tuple[Any, list[dict]]:
    """qrm's trainer exactly as `qrm train` builds it, on the first `n_pairs` prepared pairs."""
    from qrm.train import build_trainer

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

    from qrm.config import parse_recipe
    from qrm.model import cast_trainables

    side = spec["side"]
    margs, largs, dargs, targs = parse_recipe(side_flags(spec))
    n_pairs = spec["steps"] * targs.per_device_train_batch_size
    make = _trl_trainer if side == "trl" else _qrm_trainer
    trainer, rows = make(margs, largs, dargs, targs, n_pairs)
    if side == NO4BIT and spec.get("base_dtype") == "bfloat16":
        # qrm loads an unquantized base in fp32 for autocast; a bf16 LoRA baseline holds its weights in bf16, and
        # LoRA and head in bf16 as TRL casts them on the 4-bit side, so only the 4-bit storage differs.
        cast_trainables(trainer.model, torch.bfloat16, floating_only=True)
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer, rows


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one side, train `warmup` steps, then time one epoch over the pairs; returns the trial's numbers."""
    import resource

    import torch

    from qrm.config import library_versions, parse_recipe

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

    from benchmarks.tiny import train_tokenizer

    out = Path(spec["out"])
    tok = train_tokenizer(hh_texts(2000), vocab_size=512)  # few ids in use; the embedding keeps its real size
    cfg = AutoConfig.from_pretrained(spec["config_dir"])
    cfg.num_labels = 1
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init of billions of weights is seconds on a GPU, many minutes on a CPU
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="4GB")
    tok.save_pretrained(out)


def child(argv: list[str]) -> int:
    """The child process's work: `argv[0]` is a spec file; builds a real-shape backbone or runs one trial."""
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("action") == "build":
        _build_real_shapes(spec)
        return 0
    res = run_trial(spec)
    Path(spec["result"]).write_text(json.dumps(res, indent=1) + "\n")
    return 0


def hh_texts(n: int) -> list[str]:
    """The first `n` chosen texts of the shipped HH-RLHF helpful-base training file."""
    with open(HH_TRAIN) as f:
        return [json.loads(line)["chosen"] for _, line in zip(range(n), f, strict=False)]
