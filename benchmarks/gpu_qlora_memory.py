"""Peak GPU memory and speed of QLoRA reward training at real model shapes, measured beside `qrm plan`'s estimate.

Per recipe (default: llama-3.1-8b and llama-2-13b hh_rlhf_qlora.yaml; their hh_rlhf_fsdp.yaml, bf16 4-bit storage,
under an FSDP launch): a random-init model of the REAL shapes of the config.json beside the recipe, trained through
`qrm.train.build_trainer` (NF4 on load, LoRA, TRL's RewardTrainer, checkpointing on) on pairs of exactly max_length
tokens per sequence. Peak torch.cuda memory, step time, tokens/s and `qrm.plan.plan` for the same settings go to
benchmarks/results/<model>-<recipe>-<device>.json; a table prints measured vs planned (error = planned/measured - 1)
and whether the issue's goal, one 13B pair at 2 x 2048 tokens within 12 GiB (whole device peak), is met. --cap-gib 11
caps PyTorch's allocator as a 12 GiB card with ~1 GiB of CUDA context would (an OOM is then recorded, not raised).
The model is built in bf16 on CPU and saved under TMPDIR: RAM ~2 B/param + a 4 GB shard, disk 2 B/param (13B: ~30
and 26 GB; the GPU machine has 128 GiB and 64 GiB). One fresh process per recipe. Smoke test on CPU: --tiny.

GPU machine (/work/.library/device/README.md): it lacks trl, bitsandbytes and datasets and has transformers 5.17, so
wheels travel. Once, here, in the repo root (.whl/ is git-ignored; zip keeps only bitsandbytes' CUDA 13 libraries,
for torch 2.11+cu130 there, so the wheel takes a few of the 64 MiB that travel; the command lists pyarrow (>=24),
fsspec (<=2026.9.0) and regex (>=2025.10.22) there, which datasets 5.2 and transformers 5.23 need: carry any that fail):
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    transformers==5.23.0 trl==1.16.0 peft==0.21.2 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  zip -qd .whl/bitsandbytes-*.whl 'bitsandbytes/lib*_cuda1[12]*' 'bitsandbytes/lib*_rocm*' 'bitsandbytes/lib*_xpu*'
then one device `run` per recipe (a few minutes each), carry [".whl"], command:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; python3 -m pip list | grep -E '^(pyarrow|fsspec|regex) ';
  python3 benchmarks/gpu_qlora_memory.py --recipe recipes/llama-2-13b/hh_rlhf_qlora.yaml; cp benchmarks/results/* $OUT/
FSDP: the same with python3 -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml
  --num_processes 1 benchmarks/gpu_qlora_memory.py --recipe recipes/llama-2-13b/hh_rlhf_fsdp.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("llama-3.1-8b", "llama-2-13b")
GIB = 1024**3
GOAL_GIB = 12.0  # the issue: one 13B pair at 2 x 2048 tokens on a 12 GiB card
POOL = (1 << 24) - 3  # random values tiled into every weight; an odd length, so rows do not repeat in step
WORDS = ["".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=3 + i % 6)) for i in range(200)]


def build_backbone(config_dir: Path, out: Path, tiny: bool) -> Path:
    """Random-init one-label sequence classifier of `config_dir`'s shapes (shrunk if tiny) + a BPE tokenizer whose
    small vocabulary only means low token ids (the embedding keeps the config's size), saved as safetensors shards."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from benchmarks.tiny import shrink_config, train_tokenizer

    tok = train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], vocab_size=512)
    cfg = AutoConfig.from_pretrained(config_dir)
    cfg = shrink_config(cfg, vocab_size=len(tok)) if tiny else cfg
    cfg.num_labels = 1
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")  # uninitialised; non-persistent buffers (rotary) are not saved, rebuilt on load
    pool = (0.02 * torch.randn(POOL, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)  # Llama's init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms (Gemma's 1 + w: scale 2, still finite) and biases
                p.fill_(1.0 if "norm" in name else 0.0)
            else:  # one temporary copy of the largest matrix (the embedding) at most
                p.view(-1).copy_(pool.repeat(-(-p.numel() // POOL))[: p.numel()])
    model.save_pretrained(out, max_shard_size="4GB")
    tok.save_pretrained(out)
    return out


def write_pairs(path: Path, n: int, max_length: int) -> Path:
    """Pairs whose prompt alone exceeds max_length tokens; the responses are the same words rotated, each after a
    space, so both tokenize to the same length and qrm's left truncation of the prompt makes both exactly max_length."""
    rng, k = random.Random(1), max(2, min(64, max_length // 8))
    with open(path, "w") as f:
        for _ in range(n):
            resp, prompt = rng.choices(WORDS, k=k), rng.choices(WORDS, k=max_length + 8)
            row = {"prompt": " ".join(prompt), "chosen": " " + " ".join(resp)}
            f.write(json.dumps({**row, "rejected": " " + " ".join(resp[1:] + resp[:1])}) + "\n")
    return path


def step_timer(cuda: bool, times: list[float]) -> Any:
    """A TrainerCallback appending every optimizer step's duration (CUDA-synchronised at both ends) to `times`."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t0 = now()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            times.append(now() - self.t0)

    return StepTimer()


def _recipe_args(
    recipe: Path, args: argparse.Namespace, run_dir: Path, model_dir: Path, data: Path
) -> tuple[list[str], tuple[Any, Any, Any, Any]]:
    """(the flags the planner shares with training, the parsed recipe) for one run on the synthetic pairs."""
    from qrm.config import parse_recipe

    shared = ["--per_device_train_batch_size", str(args.batch), "--gradient_accumulation_steps", "1"]
    shared += ["--max_length", str(args.max_length), "--activation_checkpointing", "true"]
    # The planner sizes the worst case, 2 x batch x max_length tokens with nothing shared: measure that case.
    shared += ["--prefix_sharing", "false"]
    own = ["--max_steps", str(args.steps), "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "10"]
    own += ["--report_to", "none", "--output_dir", str(run_dir / "out")]
    margs, largs, dargs, targs = parse_recipe(["--recipe", str(recipe), *shared, *own])
    margs.model_name_or_path = str(model_dir)
    dargs.dataset, dargs.dataset_format, dargs.eval_dataset, dargs.eval_fraction = str(data), "explicit", None, 0.0
    return shared, (margs, largs, dargs, targs)


def _device_peaks(tc: Any, mem: dict[str, Any]) -> dict[str, Any]:
    """`mem` completed with the CUDA peaks, in GiB. "device": what nvidia-smi would show at the peak, reserved +
    outside PyTorch's allocator."""
    (free, mem["gpu_total"]), mem["train_peak_allocated"] = tc.mem_get_info(), tc.max_memory_allocated()
    mem["train_peak_reserved"] = tc.max_memory_reserved()
    mem["outside_allocator"] = outside = mem["gpu_total"] - free - tc.memory_reserved()  # context, cuBLAS, NCCL
    mem["train_device_peak"] = mem["train_peak_reserved"] + outside
    mem["load_device_peak"] = mem["load_peak_reserved"] + outside if "load_peak_reserved" in mem else None
    mem["device_peak"] = max(mem["load_device_peak"] or 0, mem["train_device_peak"])
    return {k: v / GIB if isinstance(v, int) else v for k, v in mem.items()}


def sharding_facts(model: Any) -> dict[str, Any]:
    """What FSDP2 did to the trained model: how many `fully_shard` units, how many 4-bit weights are sharded
    DTensors (accelerate's `fsdp2_prepare_model` leaves uint8-stored ones out), their storage dtypes, and the dtypes
    LoRA and head trained in (accelerate upcasts trainables to fp32 only for models without Params4bit)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    quant = [p for p in model.parameters() if type(p).__name__ == "Params4bit" or hasattr(p, "quant_state")]
    quant += [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit" and m.weight not in quant]
    return {
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "quantized_weights": len(quant),
        "quantized_weights_sharded": sum(isinstance(p, DTensor) for p in quant),
        "quantized_storage_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in quant}),
        "trainable_dtypes": sorted(
            {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
        ),
    }


def _write(res: dict[str, Any], device: str, out_dir: Path) -> None:
    """Write the record to <out_dir>/<recipe>-<device>.json and print its table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{res['recipe_id']}-{''.join(c if c.isalnum() else '-' for c in device.lower())}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(format_result(res) + f"\nwrote {path}", flush=True)


def run_recipe(recipe: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build, train and measure one recipe; writes the JSON record, prints the table and returns the record."""
    import torch

    from qrm.config import library_versions
    from qrm.distributed import effective_launch
    from qrm.model import choose_attention
    from qrm.packing import PAIR_BLOCKS
    from qrm.plan import plan
    from qrm.train import build_trainer

    tc, cuda, t0 = torch.cuda, torch.cuda.is_available(), time.perf_counter()
    model_dir = args.backbone_dir or work / recipe.parent.name
    if not (model_dir / "config.json").is_file():  # --backbone-dir: built once, reused by the next launch
        build_backbone(recipe.parent, model_dir, args.tiny)
    build_s, run_dir = time.perf_counter() - t0, Path(tempfile.mkdtemp(prefix="run-", dir=work))
    data = write_pairs(run_dir / "pairs.jsonl", args.steps * args.batch + 1, args.max_length)
    shared, (margs, largs, dargs, targs) = _recipe_args(recipe, args, run_dir, model_dir, data)
    # what load_base will pick; an FSDP launch on CPU-only processes runs unsharded (warned once)
    launch = effective_launch(targs)
    attn = choose_attention(margs.attn_implementation, compute_dtype=margs.bnb_4bit_compute_dtype)
    fsdp, overrides = launch.sharding == "fsdp", [*shared, "--attn_implementation", attn]
    p = plan(recipe, gpu_memory_gb=GOAL_GIB, fsdp=fsdp, overrides=overrides)
    if cuda and args.cap_gib:
        tc.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / tc.mem_get_info()[1]))
    mem: dict[str, Any] = {"oom": None}
    times: list[float] = []
    t0, t1, t2, loss = time.perf_counter(), None, None, None
    try:
        trainer, prepared = build_trainer(margs, largs, dargs, targs)
        t1 = time.perf_counter()
        if {len(r[k]) for r in prepared.train for k in ("chosen_ids", "rejected_ids")} != {args.max_length}:
            raise RuntimeError(f"a synthetic sequence is not {args.max_length} tokens long: the benchmark is wrong")
        if cuda and not fsdp:  # under FSDP the weights reach the GPU inside train(): one peak covers both
            mem["load_peak_allocated"], mem["load_peak_reserved"] = tc.max_memory_allocated(), tc.max_memory_reserved()
            tc.reset_peak_memory_stats()
        attn = getattr(trainer.model.config, "_attn_implementation", attn)
        attn = "sdpa" if attn == PAIR_BLOCKS else attn  # sdpa called once per packed sequence: sdpa's memory
        trainer.add_callback(step_timer(cuda, times))
        loss, t2 = trainer.train().training_loss, time.perf_counter()
        mem["sharding"] = sharding_facts(trainer.model_wrapped) if fsdp else None
    except torch.OutOfMemoryError as e:  # with --cap-gib: the answer is "does not fit"
        mem["oom"] = str(e).splitlines()[0]
    if cuda:
        mem = _device_peaks(tc, mem)
    ctx = p["memory_gb"]["cuda_context_nccl"]  # the planner's peaks include 1 GiB of CUDA context
    rows = [  # what, measured GiB, planned GiB
        ("training peak allocated", mem.get("train_peak_allocated"), p["train_peak_gb"] - ctx),
        ("training peak device", mem.get("train_device_peak"), p["train_peak_gb"]),
        ("loading peak device", mem.get("load_device_peak"), p["load_peak_gb"]),
    ]
    timed = times[min(5, len(times) // 2) :]  # the first steps pay for cuBLAS/allocator warm-up
    step_s, tokens = sorted(timed)[len(timed) // 2] if timed else None, 2 * args.batch * args.max_length
    device, is_13b = tc.get_device_name() if cuda else "cpu", 12e9 < p["params"]["causal_lm"] < 14e9
    res = {
        "recipe_id": f"{recipe.parent.name}-{recipe.stem}",
        "device": device,
        "launch": launch.name,
        "settings": {"steps": args.steps, "pairs_per_device": args.batch, "max_length": args.max_length},
        "timing": {"build_s": build_s, "load_s": t1 and t1 - t0, "train_s": t2 and t1 and t2 - t1},
        "train_loss": loss if loss == loss else None,  # NaN is no JSON
        "memory_gib": mem,
        "plan": p,
        "comparison": [
            {"name": n, "measured_gib": m, "planned_gib": pl, "rel_error": m and pl / m - 1} for n, m, pl in rows
        ],
        "goal": {"statement": f"one 13B pair at 2 x 2048 tokens within {GOAL_GIB:g} GiB", "planner_fits": p["fits"]},
        "versions": library_versions(),
    }
    res["goal"]["applies"] = is_13b and args.batch == 1 and args.max_length == 2048 and not args.tiny
    res["goal"]["met"] = None if not cuda else mem["oom"] is None and mem["device_peak"] <= GOAL_GIB
    res["settings"].update(tokens_per_step=tokens, attention=attn, tiny=args.tiny, cap_gib=args.cap_gib)
    res["timing"].update(step_time_s=step_s, step_times_s=times, tokens_per_s=step_s and tokens / step_s)
    res["mfu"] = mfu(recipe, largs, res)
    _write(res, device, args.out_dir)
    if args.backbone_dir is None:
        shutil.rmtree(model_dir, ignore_errors=True)  # 26 GB for 13B: free the disk before the next recipe
    return res


def mfu(recipe: Path, largs: Any, res: dict[str, Any]) -> dict[str, Any]:
    """Model FLOPs utilisation with benchmarks/trl_vs_qrm.py's count (4 N_linear + 6 N_lora + 3 L d_attn s per token) at the
    recipe's REAL shapes over the device's dense bf16 peak; None where the peak is unknown (CPU)."""
    from benchmarks.trl_vs_qrm_trial import flops_per_token, model_flops, peak_bf16_flops

    shape = model_flops(str(recipe.parent), largs.lora_r, largs.lora_target_modules)
    per_token = flops_per_token(shape, res["settings"]["max_length"])
    tokens_s, peak = res["timing"]["tokens_per_s"], peak_bf16_flops(res["device"])
    achieved = tokens_s * per_token if tokens_s and not res["settings"]["tiny"] else None
    return {"flops_per_token": per_token, "achieved_flops": achieved, "peak_bf16_flops": peak,
            "mfu": achieved / peak if achieved and peak else None}  # fmt: skip


def format_result(res: dict[str, Any]) -> str:
    """Measured vs planned as a table, then speed and the 12 GiB goal."""
    s, t, g, oom = res["settings"], res["timing"], res["goal"], res["memory_gib"]["oom"]
    out = [f"\n{res['recipe_id']} on {res['device']} ({res['launch']}): {s['pairs_per_device']} pair(s) x 2 x "]
    out[0] += f"{s['max_length']} tokens per step, {s['steps']} steps, attention {s['attention']}"
    out.append(f"  {'GiB':<26}{'measured':>10}{'planned':>10}{'error':>9}")
    for r in res["comparison"]:
        m, e = ("-", "-") if r["measured_gib"] is None else (f"{r['measured_gib']:.2f}", f"{r['rel_error']:+.1%}")
        out.append(f"  {r['name']:<26}{m:>10}{r['planned_gib']:>10.2f}{e:>9}")
    out += [f"  OUT OF MEMORY (allocator cap {s['cap_gib']} GiB): {oom}"] if oom else []
    if t["step_time_s"]:
        out.append(f"  step {t['step_time_s']:.3f} s (median), {t['tokens_per_s']:,.0f} tokens/s")
    if res.get("mfu", {}).get("mfu") is not None:
        out.append(f"  MFU {res['mfu']['mfu']:.1%} of {res['mfu']['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16")
    verdict = "not measured (no CUDA)" if g["met"] is None else ("MET" if g["met"] else "NOT MET")
    fits = "fits" if g["planner_fits"] else "does not fit"
    out.append(f"  goal, {g['statement']}: {verdict}{'' if g['applies'] else ' [not this setting]'}; planner: {fits}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, pick the recipes, run each (a fresh process per recipe when there are several)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", type=Path, help="repeatable (default: the 8B and 13B recipes)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; 2 with --tiny)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default 2048; 64 with --tiny)")
    ap.add_argument("--batch", type=int, default=1, help="pairs per device per step (default 1)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: shrunk random model, no CUDA numbers")
    ap.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results (--tiny: a temp dir)")
    ap.add_argument("--cap-gib", type=float, default=None, help="cap PyTorch's CUDA allocator at this many GiB")
    ap.add_argument("--backbone-dir", type=Path, default=None, help="build the random backbone here once and keep it")
    ap.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # child process: run recipes[ONLY]
    args = ap.parse_args(argv)
    if args.tiny:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # set before torch loads: the smoke test never touches a GPU
    os.environ.update({k: os.environ.get(k, "1") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import emulate  # QRM_EMULATE_GPU_PROCESSES=1 (the GPU check's dry run): accelerate's FSDP path on CPU processes

    emulate.install_if_requested()
    args.steps, args.max_length = args.steps or (2 if args.tiny else 30), args.max_length or (64 if args.tiny else 2048)
    stem = "hh_rlhf_fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "hh_rlhf_qlora"
    recipes = [r.resolve() for r in args.recipe or [ROOT / "recipes" / m / f"{stem}.yaml" for m in MODELS]]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or ("LOCAL_RANK" in os.environ and len(recipes) > 1):
        ap.error("under a launcher: --num_processes 1 and one --recipe per launch")
    if args.backbone_dir is not None and len(recipes) > 1:
        ap.error("--backbone-dir holds one backbone: give one --recipe")
    args.out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="qrm-gpu-bench-")) if args.tiny else RESULTS)
    if len(recipes) > 1 and args.only is None:  # a fresh process per recipe: nothing carries over
        raw = [*(sys.argv[1:] if argv is None else argv), "--out-dir", str(args.out_dir)]
        runs = [subprocess.run([sys.executable, __file__, *raw, "--only", str(i)]) for i in range(len(recipes))]
        return max(r.returncode for r in runs)
    with tempfile.TemporaryDirectory(prefix="qrm-gpu-bench-work-") as work:
        run_recipe(recipes[args.only or 0], args, Path(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
