"""FSDP2 with the 4-bit backbone on 2 CPU ranks (gloo): torch's `fully_shard` around the model `qrm.model` builds
for FSDP (bnb_4bit_quant_storage = parameter dtype = float32, fp32 compute), trained with qrm's packed, prefix-shared
Bradley-Terry loss, against the same model trained in one process without FSDP.

accelerate cannot run this: it builds its FSDP plugin only for GPU-like process types (accelerate/state.py:986,
`elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`); on CPUs it runs DDP, which is tested in
tests/test_multiprocess.py. So the loop here is hand-written, with what the Trainer would do: one FSDP unit per
decoder layer plus the root, mean loss per rank, gradients averaged by FSDP's reduce-scatter, AdamW.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import hh_rows, save_adapter_from_fsdp2

GLOBAL_BATCH, STEPS, MAX_TOKENS = 4, 2, 96


def _pairs(tokenizer: Any) -> list[dict[str, list[int]]]:
    # HH-RLHF rows: chosen and rejected share the dialogue, so the collator shares a prefix.
    rows = []
    for r in hh_rows(GLOBAL_BATCH * STEPS):
        c, j = (tokenizer(r[k])["input_ids"][-MAX_TOKENS:] for k in ("chosen", "rejected"))
        rows.append({"chosen_ids": c, "rejected_ids": j})
    return rows


def _build(model_dir: str) -> tuple[Any, Any]:
    from qrm.config import LoraArguments, ModelArguments
    from qrm.model import load_model, load_tokenizer

    margs = ModelArguments(
        model_name_or_path=model_dir, bnb_4bit_compute_dtype="float32", bnb_4bit_quant_storage="float32"
    )
    tok = load_tokenizer(margs)
    torch.manual_seed(0)  # LoRA A and the new score head: the same initial values in every process
    model = load_model(margs, LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0), tok, False, fsdp=True)
    return model, tok


def _linear4bit(model: Any) -> dict[str, Any]:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _dequantized(module: Any, packed: torch.Tensor) -> torch.Tensor:
    """The float weight the 4-bit codes in `packed` stand for, decoded with the module's quant state."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(packed.view(torch.uint8), module.quant_state)


def _run(rank: int, world: int, model_dir: str, out_dir: str) -> None:
    """Train STEPS steps on this rank's share of each global batch; write what the test compares to rank<r>.pt."""
    from torch.distributed.tensor import DTensor

    from qrm.packing import PairPackingCollator, head_module, packed_rewards

    model, tok = _build(model_dir)
    quant = _linear4bit(model)
    assert quant, "backbone is not 4-bit"
    bytes_before = sum(m.weight.untyped_storage().nbytes() for m in quant.values())
    original = {n: _dequantized(m, m.weight.data).clone() for n, m in quant.items()}
    seen_in_forward: dict[str, bool] = {}

    def check_weight(name: str) -> Any:
        def hook(module: Any, _args: Any, _out: Any) -> None:
            # bnb restores a weight FSDP handed over as a plain tensor from module.quant_state; record that it did
            import bitsandbytes as bnb

            w = module.weight
            seen_in_forward[name] = isinstance(w, bnb.nn.Params4bit) and w.quant_state is module.quant_state

        return hook

    for name, m in quant.items():
        m.register_forward_hook(check_weight(name))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    bytes_held = sum(local(m.weight).untyped_storage().nbytes() for m in quant.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optim = torch.optim.AdamW(trainable.values(), lr=5e-3)
    collate = PairPackingCollator(prefix_sharing=True)
    head = head_module(model)
    pairs = _pairs(tok)
    per_rank = GLOBAL_BATCH // world
    losses, grads = [], []
    for step in range(STEPS):
        batch = pairs[step * GLOBAL_BATCH + rank * per_rank :][:per_rank]
        rewards = packed_rewards(model, head, collate(batch))
        chosen, rejected = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()  # qrm's Bradley-Terry loss, per rank
        loss.backward()  # FSDP2 reduce-scatters the mean of the ranks' gradients
        losses.append(loss.detach().clone())
        grads.append({n: full(p.grad) for n, p in trainable.items()})
        optim.step()
        optim.zero_grad()
    if world > 1:
        save_adapter_from_fsdp2(model, out_dir, rank)
    else:
        model.save_pretrained(out_dir)
    after = {n: _dequantized(m, full(m.weight)) for n, m in quant.items()}
    torch.save(
        {
            "losses": losses,
            "grads": grads,
            "bytes_before": bytes_before,
            "bytes_held": bytes_held,
            "weight_types": sorted({type(m.weight).__name__ for m in quant.values()}),
            "placements": sorted({str(m.weight.placements) for m in quant.values() if isinstance(m.weight, DTensor)}),
            "quant_state_in_forward": seen_in_forward,
            "dequantized_equal": all(torch.equal(after[n], original[n]) for n in original),
        },
        Path(out_dir) / f"rank{rank}.pt",
    )


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run(rank, world, model_dir, out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("fsdp2")
    one, two = tmp / "one", tmp / "two"
    one.mkdir()
    two.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse this process's imports instead of paying for transformers/peft/bnb again
    mp.start_processes(_worker, args=(2, port, str(tiny_llama), str(two)), nprocs=2, start_method="fork")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(0, 1, str(tiny_llama), str(one))
    finally:
        torch.set_num_threads(threads)
    load = lambda d, r: torch.load(d / f"rank{r}.pt", weights_only=True)  # noqa: E731
    return {"one": load(one, 0), "two": [load(two, 0), load(two, 1)], "dirs": (one, two)}


def test_4bit_weights_are_sharded_and_keep_their_quant_state(runs: dict[str, Any]) -> None:
    one = runs["one"]
    for rank, res in enumerate(runs["two"]):
        ratio = res["bytes_held"] / one["bytes_held"]
        print(f"rank {rank}: 4-bit bytes held {res['bytes_held']} vs {one['bytes_held']} in one process: {ratio:.3f}")
        assert res["bytes_before"] == one["bytes_held"]  # every rank built the whole 4-bit model first
        assert 0.45 <= ratio <= 0.55, f"rank {rank} holds {ratio:.2f} of the 4-bit weights: not sharded"
        assert res["weight_types"] == ["DTensor"] and res["placements"] == ["(Shard(dim=0),)"]
        # In every forward bnb computed with a Params4bit carrying the module's quant state ...
        assert res["quant_state_in_forward"] and all(res["quant_state_in_forward"].values())
        assert res["quant_state_in_forward"].keys() == one["quant_state_in_forward"].keys()
        # ... and the gathered shards decode to the very weights the model was loaded with.
        assert res["dequantized_equal"]
    assert one["dequantized_equal"] and all(one["quant_state_in_forward"].values())


def test_losses_and_grads_equal_one_process(runs: dict[str, Any]) -> None:
    one, two = runs["one"], runs["two"]
    worst_loss = worst_grad = 0.0
    for step in range(STEPS):
        mean = (two[0]["losses"][step] + two[1]["losses"][step]) / 2
        assert torch.allclose(mean, one["losses"][step], rtol=0, atol=1e-6), (step, mean, one["losses"][step])
        worst_loss = max(worst_loss, (mean - one["losses"][step]).abs().item())
        g1, g2 = one["grads"][step], two[0]["grads"][step]
        assert g1.keys() == g2.keys() and any("score" in k for k in g1) and any("lora_B" in k for k in g1)
        for name in g1:
            assert torch.equal(g2[name], two[1]["grads"][step][name])  # both ranks see the same full gradient
            scale = g1[name].abs().max().item() or 1.0
            worst_grad = max(worst_grad, (g2[name] - g1[name]).abs().max().item() / scale)
            assert (g2[name] - g1[name]).abs().max().item() <= 1e-5 * scale, (step, name)
    print(f"FSDP2 vs one process: max |loss delta| {worst_loss:.2e}, max grad delta / max |grad| {worst_grad:.2e}")


def test_adapter_saved_from_shards_equals_one_process(runs: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    one, two = (load_file(d / "adapter_model.safetensors") for d in runs["dirs"])
    assert one.keys() == two.keys() and any("score" in k for k in one)
    worst = max((one[name] - two[name]).abs().max().item() for name in one)
    print(f"FSDP2 adapter vs one process: max |delta| {worst:.2e} over {len(one)} tensors")
    assert worst <= 1e-5
    assert all(two[n].abs().max() > 0 for n in two if "lora_B" in n), "LoRA B starts at 0: the steps did not train"
