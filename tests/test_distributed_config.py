"""accelerate_configs/ load with accelerate's own loader; check_launch and save_adapter behave under FSDP."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "accelerate_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
FSDP_RECIPE = ROOT / "recipes" / "llama-2-13b" / "hh_rlhf_fsdp.yaml"
SINGLE_RECIPE = ROOT / "recipes" / "llama-2-13b" / "hh_rlhf_qlora.yaml"


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_config_dir_holds_only_configs_and_readme() -> None:
    names = {p.name for p in CONFIG_DIR.iterdir()}
    assert {"single_gpu.yaml", "multi_gpu.yaml", "fsdp.yaml", "fsdp_multinode.yaml", "zero3.yaml"} <= names
    assert names - {p.name for p in CONFIGS} == {"README.md"}


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_config_loads_with_accelerate(path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert ClusterConfig.from_yaml_file(str(path)).to_dict() == cfg.to_dict()
    assert cfg.mixed_precision == "bf16"  # the recipes train in bf16; the FSDP/ZeRO-3 storage check assumes it


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_nested_keys_are_launcher_options(path: Path) -> None:
    """ClusterConfig does not check fsdp_config/deepspeed_config keys; `accelerate launch` maps them to its flags."""
    import yaml
    from accelerate.commands.launch import launch_command_parser

    dests = {a.dest for a in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for key in raw.get("fsdp_config") or {}:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in dests, key
    for key in raw.get("deepspeed_config") or {}:
        assert key in dests, key


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_launcher_environment(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment accelerate launch would export builds the plugin we expect."""
    from qrm.distributed import launch_env

    env = launch_env(path)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if "fsdp" not in path.name:
        assert "ACCELERATE_USE_FSDP" not in env
        if path.name == "zero3.yaml":
            assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
        return
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"  # the Trainer refuses it together with the recipes'
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # what the Accelerator builds from that environment
    assert plugin.fsdp_version == 2
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.auto_wrap_policy is not None


def _recipe(path: Path, *overrides: str):
    # Parsed before the launcher's variables are set: with ACCELERATE_USE_DEEPSPEED, TrainingArguments would build
    # a DeepSpeed config (deepspeed is an optional extra) and leave it registered globally for later tests.
    # check_launch reads the environment when it is called, as at trainer start-up.
    from qrm.config import parse_recipe

    margs, _, _, targs = parse_recipe(["--recipe", str(path), *overrides])
    return margs, targs


def _launched_with(monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    from qrm.distributed import launch_env

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in launch_env(CONFIG_DIR / config).items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp_multinode.yaml", "zero3.yaml"])
@pytest.mark.parametrize("storage", ["uint8", "float32", "float16"])
def test_check_launch_refuses_mismatched_storage(monkeypatch: pytest.MonkeyPatch, config: str, storage: str) -> None:
    from qrm.distributed import check_launch
    from qrm.errors import LaunchError

    margs, targs = _recipe(FSDP_RECIPE, "--bnb_4bit_quant_storage", storage)
    _launched_with(monkeypatch, config)
    with pytest.raises(LaunchError) as err:
        check_launch(margs, targs)
    msg = str(err.value)
    assert f"bnb_4bit_quant_storage={storage}" in msg and "bfloat16" in msg  # both values named
    assert "--bnb_4bit_quant_storage bfloat16" in msg  # and the fix


@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp_multinode.yaml", "zero3.yaml"])
def test_check_launch_accepts_matching_storage(monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    from qrm.distributed import check_launch, detect_launch

    margs, targs = _recipe(FSDP_RECIPE)
    _launched_with(monkeypatch, config)
    assert detect_launch(targs).param_dtype == "bfloat16"
    check_launch(margs, targs)


@pytest.mark.parametrize("config", ["single_gpu.yaml", "multi_gpu.yaml"])
def test_check_launch_ignores_unsharded_launches(monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    from qrm.distributed import check_launch, detect_launch

    margs, targs = _recipe(SINGLE_RECIPE)
    _launched_with(monkeypatch, config)
    assert margs.bnb_4bit_quant_storage == "uint8"
    assert detect_launch(targs).sharding is None
    check_launch(margs, targs)


def test_check_launch_reads_trainer_fsdp_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain torchrun + `--fsdp`: no accelerate variables, the Trainer's arguments say FSDP."""
    from qrm.distributed import check_launch, detect_launch
    from qrm.errors import LaunchError

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    margs = SimpleNamespace(load_in_4bit=True, bnb_4bit_quant_storage="uint8")
    targs = SimpleNamespace(fsdp=True, fsdp_plugin_args={"fsdp_version": 2}, fsdp_config={}, mixed_precision="bf16")
    assert detect_launch(targs).name == "FSDP2"
    with pytest.raises(LaunchError, match="FSDP2"):
        check_launch(margs, targs)
    check_launch(SimpleNamespace(load_in_4bit=True, bnb_4bit_quant_storage="bfloat16"), targs)
    # fp16 training shards fp16 parameters, fp32 training fp32 ones; a model that is not 4-bit is never refused
    assert detect_launch(SimpleNamespace(fsdp=True, mixed_precision="fp16")).param_dtype == "float16"
    assert detect_launch(SimpleNamespace(fsdp=True, mixed_precision="no")).param_dtype == "float32"
    check_launch(SimpleNamespace(load_in_4bit=False, bnb_4bit_quant_storage="uint8"), targs)


@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp_multinode.yaml"])
def test_fsdp_config_on_cpu_processes_warns_once_and_runs_unsharded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, config: str
) -> None:
    """accelerate builds no FSDP plugin for MULTI_CPU processes (it runs DDP): qrm says so and loads unsharded."""
    import logging

    from qrm.distributed import check_launch, effective_launch
    from qrm.errors import LaunchError

    margs, targs = _recipe(SINGLE_RECIPE)  # uint8 storage: refused under a real FSDP launch
    _launched_with(monkeypatch, config)
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    with caplog.at_level(logging.WARNING, logger="qrm"):
        launch = effective_launch(targs, environ=env, distributed_type="MULTI_CPU")
    assert launch.sharding is None and "run as DDP over 2 CPU processes" in launch.source
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "FSDP2" in lines[0] and "MULTI_CPU" in lines[0] and "running as DDP over 2 CPU processes" in lines[0]
    check_launch(margs, targs, launch)  # not treated as sharded: the uint8 storage is fine for DDP
    assert env["ACCELERATE_USE_FSDP"] == "true"  # a mapping passed in is only read

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qrm"):
        effective_launch(targs, environ={**env, "RANK": "1"}, distributed_type="MULTI_CPU")
    assert not caplog.records, "only rank 0 warns"
    # On GPUs the same config shards, and the storage check applies.
    gpu = effective_launch(targs, environ=env, distributed_type="MULTI_GPU")
    assert gpu.name == "FSDP2"
    with pytest.raises(LaunchError):
        check_launch(margs, targs, gpu)
    # Read from the process itself (no GPU here): falls back and turns accelerate's FSDP switch off for transformers,
    # which would otherwise load the weights on rank 0 only (is_fsdp_enabled) for a run that is not FSDP.
    assert effective_launch(targs).sharding is None
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"


def _fsdp2_save_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from conftest import save_adapter_from_fsdp2
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same init on both ranks, as FSDP's broadcast from rank 0 would give
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.bfloat16)
        lora = LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS", init_lora_weights=False)
        model = get_peft_model(model, lora)
        if rank == 0:
            ref = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            torch.save(ref, Path(out_dir) / "reference.pt")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        save_adapter_from_fsdp2(model, out_dir, rank)
    finally:
        dist.destroy_process_group()


def test_save_adapter_gathers_fsdp2_shards(tmp_path: Path) -> None:
    """Two CPU ranks shard LoRA + head with FSDP2; the saved adapter loads without FSDP and equals the weights."""
    import socket

    import torch
    import torch.multiprocessing as mp
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
    )
    cfg.num_labels = 1
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "base")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "adapter"
    out.mkdir()
    # fork: the children reuse this process's imports instead of paying for transformers/peft again
    mp.start_processes(
        _fsdp2_save_worker,
        args=(2, port, str(tmp_path / "base"), str(out)),
        nprocs=2,
        start_method="fork",
    )
    ref = torch.load(out / "reference.pt")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1, dtype=torch.bfloat16)
    loaded = dict(PeftModel.from_pretrained(base, out).named_parameters())
    assert len(ref) == 2 * 7 * 2 + 1  # lora A and B on 7 linears x 2 layers + the score head copy
    for name, tensor in ref.items():
        assert torch.equal(loaded[name], tensor), name


def test_save_adapter_without_fsdp_uses_trainer(tmp_path: Path) -> None:
    calls = []
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(state=SimpleNamespace()), save_model=lambda d: calls.append(d), model=None
    )
    from qrm.distributed import save_adapter

    assert save_adapter(trainer, tmp_path) == tmp_path
    assert calls == [str(tmp_path)]
