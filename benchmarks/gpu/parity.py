"""Packed + prefix-shared training steps against TRL's padded path, on one 4-bit model: rewards, LoRA/head gradients
and pairs/s; then flash-attn varlen packing (no sharing) against the same padded path when flash-attn is installed.

Real shapes of a recipe's config.json (default llama-3.2-1b: built in seconds), random init (no Hub), loaded by
`qrm.model.load_model` as training loads it (NF4, LoRA, fp32 score head, the recipe's compute dtype under autocast).
The padded side is TRL's own `DataCollatorForPreference` + the model's forward, as `RewardTrainer.compute_loss` runs
it; the packed side is qrm's `PairPackingCollator` + `packed_rewards` with per-pair sdpa, as `qrm train` runs it.
HH-RLHF pairs from data/ (their real length profile), the dialogue cut from the left to fit --max-length.
Writes <out-dir>/gpu-parity-<device>.json. `--dry-run`: CPU, tiny shapes, fp32, a few pairs (exercises every path).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def load_pairs(tokenizer: Any, n: int, max_length: int) -> list[dict[str, list[int]]]:
    """The first n HH-RLHF helpful pairs whose responses fit max_length, the shared dialogue cut from the left so
    the longer sequence is max_length at most (as qrm's data step cuts prompts)."""
    from qrm.packing import shared_prefix_len

    rows = []
    with open(ROOT / "data" / "hh-rlhf-helpful" / "helpful-base.train.jsonl") as f:
        for line in f:
            r = json.loads(line)
            c, j = (tokenizer(r[k])["input_ids"] for k in ("chosen", "rejected"))
            prefix = shared_prefix_len(c, j)
            tail = max(len(c), len(j)) - prefix
            if tail >= max_length:
                continue
            cut = max(0, prefix - (max_length - tail))
            rows.append({"chosen_ids": c[cut:], "rejected_ids": j[cut:]})
            if len(rows) == n:
                break
    return rows


def build_model(model_dir: Path, compute: str, attn: str) -> tuple[Any, Any]:
    import torch

    from qrm.config import LoraArguments, ModelArguments
    from qrm.model import load_model, load_tokenizer

    margs = ModelArguments(model_name_or_path=str(model_dir), bnb_4bit_compute_dtype=compute, attn_implementation=attn)
    tok = load_tokenizer(margs)
    torch.manual_seed(0)
    model = load_model(margs, LoraArguments(lora_r=16, lora_alpha=32, lora_dropout=0.0), tok, False)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights under autocast, as qrm keeps them on fp32 compute
    return model, tok


def step(model: Any, batch: dict[str, Any], packed: bool, autocast: Any) -> tuple[Any, dict[str, Any]]:
    """One forward + backward of the Bradley-Terry loss; returns (rewards, gradients of the trainable weights)."""
    import torch

    from qrm.packing import head_module, packed_rewards

    model.zero_grad(set_to_none=True)
    with autocast():
        if packed:
            rewards = packed_rewards(model, head_module(model), batch)
        else:
            rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    rewards = rewards.float()
    chosen, rejected = rewards.chunk(2)
    (-torch.nn.functional.logsigmoid(chosen - rejected).mean()).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return rewards.detach(), grads


def compare(a: tuple[Any, dict], b: tuple[Any, dict]) -> dict[str, float]:
    """Largest reward and gradient differences, relative to the largest magnitude of each tensor."""
    ra, rb = a[0], b[0]
    out = {"reward_max_abs_diff": (ra - rb).abs().max().item(), "reward_max_abs": rb.abs().max().item()}
    out["reward_rel_diff"] = out["reward_max_abs_diff"] / max(out["reward_max_abs"], 1e-12)
    rel = [(a[1][n] - b[1][n]).abs().max().item() / max(b[1][n].abs().max().item(), 1e-12) for n in b[1]]
    out["grad_max_rel_diff"] = max(rel)
    out["grad_tensors"] = len(rel)
    return out


def inference_vs_training(model: Any, pairs: list[dict], autocast: Any, tokens: int = 48) -> dict[str, Any]:
    """Rewards of short sequences (the last `tokens` of each of the first 4 pairs' chosen ids) scored as `qrm score`
    scores them (no grad: bitsandbytes' `matmul_4bit` calls its fused `gemm_4bit` op, a custom CUDA kernel for few
    rows, bitsandbytes/backends/cuda/ops.py `_gemm_4bit_use_custom_cuda`) against the training path (inputs that
    need grad: dequantize + linear in `MatMul4Bit`). The difference is what an export's verification or a server
    sees beside the rewards training computed."""
    import torch

    dev = next(p.device for p in model.parameters())
    ids = [torch.tensor([p["chosen_ids"][-tokens:]], device=dev) for p in pairs[:4]]
    with torch.no_grad(), autocast():
        infer = torch.cat([model(input_ids=x).logits[:, 0].float() for x in ids])
    with torch.enable_grad(), autocast():
        embed = model.get_input_embeddings()
        train = torch.cat([model(inputs_embeds=embed(x).detach().requires_grad_()).logits[:, 0].float() for x in ids])
    diff = (infer - train.detach()).abs().max().item()
    top = train.detach().abs().max().item()
    return {
        "sequences": len(ids),
        "tokens": tokens,
        "reward_max_abs_diff": diff,
        "reward_rel_diff": diff / max(top, 1e-12),
    }


def run_side(model: Any, batches: list[dict[str, Any]], packed: bool, autocast: Any, sync: Any) -> dict[str, Any]:
    """Results of the first batch, and the time of the others (after one untimed warm-up batch)."""
    first = step(model, batches[0], packed, autocast)
    sync()
    t0 = time.perf_counter()
    for batch in batches[1:]:
        step(model, batch, packed, autocast)
    sync()
    return {"first": first, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe-dir", type=Path, default=ROOT / "recipes" / "llama-3.2-1b", help="holds config.json")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--batches", type=int, default=6, help="steps per side (the first is not timed)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, fp32")
    args = ap.parse_args(argv)
    import contextlib
    import importlib.util

    import torch
    from gpu_qlora_memory import build_backbone
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from qrm.config import library_versions
    from qrm.packing import PairPackingCollator, use_pair_blocks

    cuda = torch.cuda.is_available() and not args.dry_run
    if args.dry_run:
        args.batch, args.batches, args.max_length = 2, 2, 128
    device = torch.cuda.get_device_name() if cuda else "cpu"
    compute = "bfloat16" if cuda else "float32"

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    res: dict[str, Any] = {
        "device": device,
        "recipe_dir": str(args.recipe_dir.relative_to(ROOT)),
        "dry_run": args.dry_run,
    }
    res["settings"] = {"pairs_per_step": args.batch, "steps": args.batches, "max_length": args.max_length,
                       "compute_dtype": compute}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="qrm-gpu-parity-") as work:
        model_dir = build_backbone(args.recipe_dir, Path(work) / "model", tiny=args.dry_run)
        model, tok = build_model(model_dir, compute, "sdpa")
        pairs = load_pairs(tok, args.batch * args.batches, args.max_length)
        dev = next(p.device for p in model.parameters())
        trl = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
        padded = _batches(trl, pairs, args.batch, dev)
        use_pair_blocks(model)  # as qrm train does; padded batches still run plain sdpa
        shared = PairPackingCollator(prefix_sharing=True)
        packed = _batches(shared, pairs, args.batch, dev)
        trl_side = run_side(model, padded, False, autocast, sync)
        qrm_side = run_side(model, packed, True, autocast, sync)
        timed_pairs = args.batch * (args.batches - 1)
        res["packed_prefix_shared_vs_trl_padded"] = {
            **compare(qrm_side["first"], trl_side["first"]),
            "trl_pairs_per_s": timed_pairs / trl_side["seconds"],
            "qrm_pairs_per_s": timed_pairs / qrm_side["seconds"],
            "speedup": trl_side["seconds"] / qrm_side["seconds"],
            "padded_tokens": sum(b["input_ids"].numel() for b in padded),
            "packed_tokens": sum(b["input_ids"].numel() for b in packed),
        }
        has_flash = cuda and importlib.util.find_spec("flash_attn") is not None
        flash: dict[str, Any] = {"ran": has_flash, "kernel": "flash_attention_2" if has_flash else None}
        if not has_flash:
            flash["why_not"] = "no CUDA (dry run)" if not cuda else "flash_attn is not installed"
        # packing without sharing (flash-attn takes boundaries only): on sdpa without flash-attn, else varlen
        if has_flash:
            del model
            model, _ = build_model(model_dir, compute, "flash_attention_2")
        plain = PairPackingCollator(prefix_sharing=False)
        varlen = _batches(plain, pairs, args.batch, dev)
        flash_side = run_side(model, varlen, True, autocast, sync)
        flash.update(compare(flash_side["first"], trl_side["first"]))
        flash["pairs_per_s"] = timed_pairs / flash_side["seconds"]
        res["varlen_packing_vs_trl_padded"] = flash
        # last: a no-grad forward may repack 4-bit weights for the CPU's AVX512-BF16 kernel (bitsandbytes
        # Linear4bit.forward), which would change every later CPU forward
        res["inference_vs_training_4bit_path"] = inference_vs_training(model, pairs, autocast)
    res["versions"] = library_versions()
    _write(res, device, args.out_dir)
    return 0


def _batches(collate: Any, pairs: list[dict], batch: int, dev: Any) -> list[dict[str, Any]]:
    """`pairs` collated `batch` at a time, on `dev`."""
    return [{k: v.to(dev) for k, v in collate(pairs[i : i + batch]).items()} for i in range(0, len(pairs), batch)]


def _write(res: dict[str, Any], device: str, out_dir: Path) -> None:
    """Write <out_dir>/gpu-parity-<device>.json and print its two comparisons."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower())
    path = out_dir / f"gpu-parity-{slug}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    p, f = res["packed_prefix_shared_vs_trl_padded"], res["varlen_packing_vs_trl_padded"]
    print(
        f"packed+shared vs TRL padded on {device}: reward rel diff {p['reward_rel_diff']:.2e}, grad rel diff "
        f"{p['grad_max_rel_diff']:.2e}, pairs/s {p['trl_pairs_per_s']:.2f} -> {p['qrm_pairs_per_s']:.2f} "
        f"({p['speedup']:.2f}x)\nvarlen packing ({f['kernel'] or 'sdpa stand-in: ' + f['why_not']}): reward rel "
        f"diff {f['reward_rel_diff']:.2e}, grad rel diff {f['grad_max_rel_diff']:.2e}\nwrote {path}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
