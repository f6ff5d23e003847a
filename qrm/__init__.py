"""qrm: reward models on 4-bit quantized LLM backbones (QLoRA + TRL RewardTrainer)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["RewardModel", "__version__", "reward_function"]


def __getattr__(name: str):
    # Keep `import qrm` light: torch and transformers load only when the API is used.
    if name == "RewardModel":
        from .score import RewardModel

        return RewardModel
    if name == "reward_function":
        from .trl_reward import reward_function

        return reward_function
    raise AttributeError(name)
