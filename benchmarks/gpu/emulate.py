"""CPU emulation of what accelerate does on GPU processes, so the GPU check's FSDP step runs accelerate's own FSDP2
preparation (`Accelerator._prepare_fsdp2` -> `accelerate.utils.fsdp_utils.fsdp2_prepare_model`) in the dry run.

accelerate 1.15 builds its FSDP plugin only when `PartialState._prepare_backend` chose a GPU-like process type
(accelerate/state.py, `AcceleratorState.__init__`: `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`),
and it chooses MULTI_GPU only when `torch.cuda.is_available()` (`_prepare_backend`, the `elif
torch.cuda.is_available()` branch). `fake_gpu_processes` makes that choice say MULTI_GPU on a CPU process started by
`accelerate launch` (LOCAL_RANK set) with the gloo backend, and keeps the device on the CPU (`set_device`). Everything
after that is accelerate's, transformers' and qrm's real code: the FSDP plugin read from the launch environment,
`qrm.distributed.effective_launch` seeing FSDP2, the model loaded for FSDP (bf16 storage), the auto-wrap policy from
`_no_split_modules`, the Params4bit branch of `fsdp2_prepare_model`, `fully_shard` on a gloo mesh, the mixed
precision policy and the training steps. What this cannot show: CUDA kernels, NCCL, memory.

Turned on by QRM_EMULATE_GPU_PROCESSES=1 in the environment of a process that imports this module and calls
`install_if_requested()` before accelerate builds its state (benchmarks/gpu_qlora_memory.py does).
"""

from __future__ import annotations

import os
from typing import Any

ENV = "QRM_EMULATE_GPU_PROCESSES"


def fake_gpu_processes() -> None:
    """Patch accelerate's `PartialState` so a CPU process under `accelerate launch` counts as a MULTI_GPU process
    (gloo backend, device `cpu`). Idempotent; refuses to run where CUDA is available (a real GPU needs no fake)."""
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available():
        raise RuntimeError(f"{ENV}=1 on a machine with CUDA: the emulation is for CPU dry runs only")
    if getattr(PartialState, "_qrm_emulated", False):
        return
    original = PartialState._prepare_backend

    def prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None) -> Any:
        if int(os.environ.get("LOCAL_RANK", -1)) != -1:
            # qrm.config sets use_cpu on a machine without CUDA, and accelerate then skips init_process_group
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("gloo")
            return "gloo", DistributedType.MULTI_GPU
        return original(self, cpu, sagemaker_dp, backend)

    def set_device(self: Any) -> None:
        if self.device is None:
            self.device = torch.device("cpu")

    PartialState._prepare_backend = prepare_backend
    PartialState.set_device = set_device
    PartialState._qrm_emulated = True


def install_if_requested() -> bool:
    """Call `fake_gpu_processes` when QRM_EMULATE_GPU_PROCESSES=1; returns whether it did."""
    if os.environ.get(ENV, "") != "1":
        return False
    fake_gpu_processes()
    return True
