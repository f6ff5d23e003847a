"""CUDA-only decisions, emulated on the CPU: what qrm decides when `torch.cuda.is_available()` is True (device
placement, dtypes, autocast, the attention kernel), what accelerate exports for accelerate_configs/fsdp.yaml and how
qrm reads it on GPU processes, and transformers' flash-attention varlen dispatch on qrm's packed rows (with only
the flash kernel replaced by sdpa). docs/gpu.md lists the assumption each test pins and the upstream code behind it.
Nothing here loads weights on a GPU; the GPU check (benchmarks/gpu/run.sh) runs the real kernels.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


class _Loaded(Exception):
    """Raised by the faked `from_pretrained` with the arguments qrm passed it."""

    def __init__(self, kwargs: dict[str, Any]):
        super().__init__("from_pretrained called")
        self.kwargs = kwargs


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Any:
    """torch reports 2 visible GPUs and flash-attn is importable; nothing is allocated on them. Everything that reads
    CUDA at import time is imported first, on the real (CPU) answer."""
    import peft  # noqa: F401
    import transformers
    import trl

    import qrm.model
    import qrm.trl_reward

    _ = (transformers.TrainingArguments, transformers.BitsAndBytesConfig, trl.RewardConfig, qrm.model.load_base)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    return monkeypatch


def _load_kwargs(tiny_llama: Path, fsdp: bool, **margs: Any) -> dict[str, Any]:
    """The keyword arguments `qrm.model.load_base` hands transformers' `from_pretrained` (on faked CUDA)."""
    from transformers import AutoModelForSequenceClassification

    from qrm.config import ModelArguments
    from qrm.model import load_base, load_tokenizer

    args = ModelArguments(model_name_or_path=str(tiny_llama), **margs)
    tok = load_tokenizer(args)

    def fake(*_a: Any, **kw: Any) -> Any:
        raise _Loaded(kw)

    original = AutoModelForSequenceClassification.from_pretrained
    AutoModelForSequenceClassification.from_pretrained = fake  # type: ignore[method-assign]
    try:
        with pytest.raises(_Loaded) as got:
            load_base(args, tok, fsdp=fsdp)
    finally:
        AutoModelForSequenceClassification.from_pretrained = original  # type: ignore[method-assign]
    return got.value.kwargs


def test_load_on_cuda_places_dtypes_and_kernel(tiny_llama: Path, fake_cuda: Any) -> None:
    """One GPU process: NF4 with the recipe's compute dtype, uint8 storage, fp32 non-quantized weights, the head
    never quantized, placed on LOCAL_RANK modulo the visible GPUs (accelerate's rule), flash attention for a bf16
    compute dtype, sdpa for fp32 (flash-attn takes 16-bit only)."""
    fake_cuda.setenv("LOCAL_RANK", "3")  # a launcher that shows this process 2 GPUs (e.g. SLURM + torchrun)
    kw = _load_kwargs(tiny_llama, fsdp=False, bnb_4bit_compute_dtype="bfloat16")
    q = kw["quantization_config"]
    assert kw["device_map"] == {"": 1}, kw["device_map"]
    assert kw["dtype"] == torch.float32 and kw["attn_implementation"] == "flash_attention_2"
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_quant_storage == torch.uint8
    assert "score" in q.llm_int8_skip_modules
    assert _load_kwargs(tiny_llama, fsdp=False, bnb_4bit_compute_dtype="float32")["attn_implementation"] == "sdpa"


def test_load_for_fsdp_on_cuda(tiny_llama: Path, fake_cuda: Any) -> None:
    """Under FSDP: no device_map (transformers' bnb quantizer puts the weights on torch.cuda.current_device(), which
    accelerate set per process), every float weight in the storage dtype so FSDP2 shards one dtype."""
    kw = _load_kwargs(tiny_llama, fsdp=True, bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_storage="bfloat16")
    assert "device_map" not in kw
    assert kw["dtype"] == torch.bfloat16 and kw["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16


def test_policy_device_follows_accelerate(fake_cuda: Any) -> None:
    from qrm.trl_reward import policy_device

    fake_cuda.setenv("LOCAL_RANK", "3")
    assert policy_device() == "cuda:1"
    fake_cuda.setenv("LOCAL_RANK", "1")
    assert policy_device() == "cuda:1"
    fake_cuda.setattr(torch.cuda, "is_available", lambda: False)
    assert policy_device() == "cpu"


def test_precision_rule_for_gpu_recipes() -> None:
    """The GPU recipes (bf16 compute) train under bf16 autocast, which the Trainer hands accelerate as
    mixed_precision=bf16; an fp32 compute recipe trains without autocast."""
    from types import SimpleNamespace

    from qrm.config import ModelArguments
    from qrm.model import resolve_precision, trainable_dtype

    targs = SimpleNamespace(bf16=False, fp16=False, mixed_precision="no")
    margs = ModelArguments(model_name_or_path="x", bnb_4bit_compute_dtype="bfloat16")
    assert resolve_precision(margs, targs) is not None
    assert (targs.bf16, targs.mixed_precision) == (True, "bf16") and trainable_dtype(margs) is None
    margs = ModelArguments(model_name_or_path="x", bnb_4bit_compute_dtype="float32")
    targs = SimpleNamespace(bf16=True, fp16=False, mixed_precision="bf16")
    resolve_precision(margs, targs)
    assert (targs.bf16, targs.mixed_precision) == (False, "no") and trainable_dtype(margs) == torch.float32


def _fsdp_yaml_env() -> dict[str, str]:
    """What `accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1` exports to its
    process, computed by accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "1", "x.py"]
    )
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp  # accelerate launch then runs multi_gpu_launcher (torchrun), even for one process
    return prepare_multi_gpu_env(args)


def test_fsdp_config_on_gpu_processes_is_fsdp2_bf16() -> None:
    """On GPU processes (accelerate's MULTI_GPU) the FSDP config is FSDP2 with bf16 parameters: a recipe with bf16
    4-bit storage passes, the default uint8 storage is refused before any weight is read. On CPU processes (NO)
    the same environment runs unsharded."""
    from qrm.config import ModelArguments
    from qrm.distributed import check_launch, effective_launch
    from qrm.errors import LaunchError

    env = _fsdp_yaml_env()
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["ACCELERATE_MIXED_PRECISION"]) == ("true", "2", "bf16")
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    launch = effective_launch(None, env, distributed_type="MULTI_GPU")
    assert (launch.sharding, launch.fsdp_version, launch.param_dtype) == ("fsdp", 2, "bfloat16")
    good = ModelArguments(model_name_or_path="x", bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_storage="bfloat16")
    check_launch(good, None, launch)
    with pytest.raises(LaunchError, match="bnb_4bit_quant_storage"):
        check_launch(ModelArguments(model_name_or_path="x"), None, launch)
    assert effective_launch(None, {**env, "RANK": "1"}, distributed_type="NO").sharding is None


def test_accelerate_builds_fsdp_plugin_on_emulated_gpu_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/gpu/emulate.py (the dry run's FSDP step): with the launch environment of fsdp.yaml, accelerate's
    own state machinery picks DistributedType.FSDP and builds an FSDP2 plugin with bf16 mixed precision."""
    import subprocess
    import sys

    env = {**os.environ, **_fsdp_yaml_env(), "QRM_EMULATE_GPU_PROCESSES": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    code = (
        "import sys; sys.path.insert(0, 'benchmarks/gpu'); import emulate; assert emulate.install_if_requested()\n"
        "from accelerate import Accelerator\n"
        "a = Accelerator()\n"
        "p = a.state.fsdp_plugin\n"
        "print(a.distributed_type, p.fsdp_version, p.mixed_precision_policy.param_dtype, a.device, a.is_fsdp2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-5:] == ["DistributedType.FSDP", "2", "torch.bfloat16", "cpu", "True"], proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_emulation_refuses_a_real_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import emulate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CPU dry runs only"):
        emulate.fake_gpu_processes()


def _sdpa_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, **kw: Any) -> Any:
    """flash_attn_varlen_func's contract ((total, heads, dim) in and out, one causal sequence per cu_seqlens
    slice), computed with sdpa. GQA: flash-attn repeats the KV heads itself."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and kw.get("causal") is True
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens_q.tolist()
    for s, e in itertools.pairwise(bounds):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        scale = kw.get("softmax_scale")
        out[s:e] = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(
            0, 1
        )
    _sdpa_varlen.calls.append(bounds)  # type: ignore[attr-defined]
    return out


def test_flash_varlen_dispatch_on_packed_rows(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qrm's packing without sharing on `flash_attention_2`: qrm passes no mask, transformers derives the sequence
    boundaries from position_ids restarting at 0 (`_is_packed_sequence`, `prepare_fa_kwargs_from_position_ids`)
    and calls the varlen kernel once per layer with them; the rewards equal the padded forward's. Only the kernel
    is replaced (by `_sdpa_varlen`); transformers' dispatch and qrm's collator and reward indexing are real."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qrm.packing import PairPackingCollator, head_module, packed_rewards

    _sdpa_varlen.calls = []  # type: ignore[attr-defined]
    fns = (None, _sdpa_varlen, None, None, None)
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: (fns, (fa._process_flash_attention_kwargs, dict)))  # fmt: skip
    monkeypatch.setattr(fa, "_process_flash_attention_kwargs", _supported_kwargs)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32).eval()
    model.config.pad_token_id = tok.pad_token_id
    texts = [
        ("\n\nHuman: hi there\n\nAssistant:", " hello, how can I help?", " no."),
        ("\n\nHuman: 2+2?", " 4", " five"),
    ]
    pairs = [{"chosen_ids": tok(p + c)["input_ids"], "rejected_ids": tok(p + r)["input_ids"]} for p, c, r in texts]
    with torch.no_grad():
        padded = [model(input_ids=torch.tensor([ids])).logits[0, 0] for k in ("chosen_ids", "rejected_ids") for ids in (p[k] for p in pairs)]  # fmt: skip
        model.config._attn_implementation = "flash_attention_2"
        batch = PairPackingCollator(prefix_sharing=False)(pairs)
        packed = packed_rewards(model, head_module(model), batch)
    n_layers = model.config.num_hidden_layers
    lengths = [len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    expected = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert _sdpa_varlen.calls == [expected] * n_layers, _sdpa_varlen.calls  # type: ignore[attr-defined]
    assert torch.allclose(packed, torch.stack(padded), atol=1e-5), (packed, padded)


def _supported_kwargs(**kw: Any) -> dict[str, Any]:
    """transformers' kwargs for the varlen kernel, as `_process_flash_attention_kwargs` would pass flash-attn 2.8."""
    out = {"causal": kw["is_causal"] and not (kw.get("use_top_left_mask") and kw["query_length"] == 1)}
    if kw.get("softmax_scale") is not None:
        out["softmax_scale"] = kw["softmax_scale"]
    return out
