"""Compare `qrm.plan`'s estimate with memory measured on CPU for a tiny 4-bit Llama + LoRA reward model.

Run: `python benchmarks/plan_vs_measured.py [--json]` (about 20 s on 2 cores; tests/test_plan.py runs it too).

What is measured, and how honestly:
- weights: the exact bytes of every parameter, buffer and bitsandbytes quant-state tensor after loading in 4 bit
  (deduplicated by storage). Deterministic; compared with the planner's 4-bit weight formula.
- one training step (forward + backward + AdamW step on chosen+rejected): the peak resident-set growth of this
  process, read from /proc/self/status VmHWM after resetting it through /proc/self/clear_refs. glibc is told to
  serve every allocation above 64 KiB with mmap (mallopt), so freed tensors leave the RSS at once and the
  high-water mark tracks the peak of live tensors. It also counts allocator metadata and Python objects (about
  1 MiB of noise here), and CPU kernels are not CUDA kernels: sdpa without padding runs the CPU flash kernel,
  whose saved tensors match the planner's flash_attention_2 terms; eager is the same code on both devices.
  The CUDA-only constants (context, NCCL, allocator slack) are left out of the comparison.
- CPU kernels are pinned to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, set before torch loads): on AVX512-BF16
  CPUs the bf16 autocast kernels keep ~15 MiB of extra workspace in the checkpointed cases (measured 36.8 MiB
  against 21.5 MiB pinned, same machine), a CPU artefact no GPU has, and CI machines differ in which ISA they have.
Linux only (needs /proc/self/clear_refs and glibc).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Before torch is imported (see the docstring): the same kernels, hence the same workspace, on every x86 CPU.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


def _use_mmap_for_large_allocations() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)  # fixed threshold: also stops glibc from raising it after frees
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024)


def _rss() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS


def make_tiny_llama(path: str | Path) -> Path:
    """qrm's tiny random Llama (2 layers, hidden 64, intermediate 128) with a BPE tokenizer, saved to `path`."""
    from benchmarks.tiny import build_tiny_llama

    words = "the reward model prefers helpful honest harmless answers over evasive rude wrong ones".split()
    texts = [" ".join(words[(k + j) % len(words)] for j in range(24)) for k in range(200)]
    return build_tiny_llama(path, texts)


def load_qlora(path: str | Path, attn: str, lora_r: int, checkpointing: bool, fsdp_layout: bool) -> Any:
    """Load exactly as `qrm train` does (qrm.model.load_model), then cast trainables to bf16 as TRL does.

    fsdp_layout=True loads the way qrm does under FSDP (bf16 storage and base, no k-bit preparation), unsharded.
    """
    import torch
    from trl.trainer.utils import disable_dropout_in_model

    from qrm.config import LoraArguments, ModelArguments
    from qrm.model import load_model, load_tokenizer

    margs = ModelArguments(
        model_name_or_path=str(path),
        attn_implementation=attn,
        bnb_4bit_quant_storage="bfloat16" if fsdp_layout else "uint8",
    )
    largs = LoraArguments(lora_r=lora_r, lora_alpha=2 * lora_r)
    model = load_model(margs, largs, load_tokenizer(margs), gradient_checkpointing=checkpointing, fsdp=fsdp_layout)
    if fsdp_layout and checkpointing:  # the Trainer does this when prepare_model_for_kbit_training did not
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # trl/trainer/reward_trainer.py does this for quantized models
    disable_dropout_in_model(model)  # RewardConfig.disable_dropout defaults to True
    model.train()
    return model


def weight_bytes(model: Any) -> int:
    """Exact bytes of parameters, buffers and 4-bit quant states (each storage once)."""
    import torch

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                add(t)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    for b in model.buffers():
        add(b)
    return sum(seen.values())


def measure_step(model: Any, batch_pairs: int, seq_len: int) -> int:
    """Peak RSS growth (bytes) of one forward+backward+AdamW step on 2 x batch_pairs sequences."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (2 * batch_pairs, seq_len), generator=torch.Generator().manual_seed(0))

    def step(x: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate does for bf16 on CPU
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float().squeeze(-1)
        chosen, rejected = logits.chunk(2)
        (-torch.nn.functional.logsigmoid(chosen - rejected).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(ids[:, :8])  # warm-up: lazy inits and the optimizer states are allocated outside the measurement
    gc.collect()
    _reset_peak()
    before, _ = _rss()
    step(ids)
    _, peak = _rss()
    return peak - before


CASES = [
    # qrm's single-GPU/DDP layout (fp32 embeddings/norms/residual, uint8 storage) and its FSDP layout (all bf16)
    {"layout": "default", "attn": "sdpa", "checkpointing": True, "seq_len": 1024},
    {"layout": "default", "attn": "sdpa", "checkpointing": False, "seq_len": 1024},
    {"layout": "default", "attn": "eager", "checkpointing": True, "seq_len": 512},
    {"layout": "fsdp", "attn": "sdpa", "checkpointing": True, "seq_len": 1024},
    {"layout": "fsdp", "attn": "sdpa", "checkpointing": False, "seq_len": 1024},
    {"layout": "fsdp", "attn": "eager", "checkpointing": False, "seq_len": 512},
]


def run(cases: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Measure every case and put the planner's numbers beside it."""
    _use_mmap_for_large_allocations()
    warnings.filterwarnings("ignore")
    import torch

    from qrm.plan import architecture, estimate

    torch.set_num_threads(1)  # fewer per-thread scratch buffers in the RSS
    lora_r, batch_pairs = 8, 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_llama(Path(tmp) / "tiny-llama")
        arch = architecture(str(path))
        for case in cases or CASES:
            fsdp_layout = case["layout"] == "fsdp"
            model = load_qlora(path, case["attn"], lora_r, case["checkpointing"], fsdp_layout)
            measured_weights = weight_bytes(model)
            measured_step = measure_step(model, batch_pairs, case["seq_len"])
            # CPU sdpa without padding runs the flash kernel with native GQA: plan it as flash_attention_2
            est = estimate(
                arch,
                quant_storage="bfloat16" if fsdp_layout else "uint8",
                base_dtype="bfloat16" if fsdp_layout else "float32",
                lora_r=lora_r,
                per_device_batch=batch_pairs,
                max_length=case["seq_len"],
                checkpointing=case["checkpointing"],
                attn_implementation="flash_attention_2" if case["attn"] == "sdpa" else "eager",
            )
            b = est["bytes"]
            # weight_bytes() also sees the LoRA A/B and the head copy, which the planner books as trainable
            planned_weights = b["weights"] + est["trainable_params"] * 2
            grads = est["trainable_params"] * 2  # the step re-allocates the grads; weights and states pre-exist
            activations = b["activations"] / 1.10  # no caching allocator on CPU: drop the slack
            planned_step = activations + b["transients"] + grads
            results.append(
                {
                    **case,
                    "weights_measured": measured_weights,
                    "weights_planned": planned_weights,
                    "weights_error": planned_weights / measured_weights - 1,
                    "step_measured": measured_step,
                    "step_planned": planned_step,
                    "step_error": planned_step / measured_step - 1,
                }
            )
            del model
            gc.collect()
    return results


def main() -> int:
    """Print the comparison as a table (or JSON with --json)."""
    results = run()
    if "--json" in sys.argv[1:]:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'case':<36}{'weights meas/plan (KiB)':>26}{'err':>8}{'step meas/plan (MiB)':>24}{'err':>8}")
    for r in results:
        name = f"{r['layout']} {r['attn']} ckpt={r['checkpointing']} L={r['seq_len']}"
        w = f"{r['weights_measured'] / 1024:.0f}/{r['weights_planned'] / 1024:.0f}"
        s = f"{r['step_measured'] / 2**20:.1f}/{r['step_planned'] / 2**20:.1f}"
        print(f"{name:<36}{w:>26}{r['weights_error']:>8.1%}{s:>24}{r['step_error']:>8.1%}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
