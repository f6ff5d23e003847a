"""qrm: reward models on 4-bit quantized LLM backbones (QLoRA + TRL RewardTrainer)."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# bitsandbytes 0.50 on AVX512-BF16 CPUs warns at import that it cannot fetch a Hub kernel ("Failed to load CPU
# gemm_4bit_forward from kernels-community", bitsandbytes/backends/cpu/ops.py) for its bf16 inference repacking,
# which qrm switches off (model.keep_training_matmul): the kernel is never used, so the line is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["RewardModel", "__version__", "reward_function"]


def __getattr__(name: str):
    # Keep `import qrm` light: torch and transformers load only when the API is used.
    if name == "RewardModel":
        from .reward_model import RewardModel

        return RewardModel
    if name == "reward_function":
        from .trl_reward import reward_function

        return reward_function
    raise AttributeError(name)
