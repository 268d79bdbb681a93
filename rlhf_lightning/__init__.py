"""rlhf_lightning: PyTorch Lightning modules for RL fine-tuning of language models."""

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.modules.grpo import GRPOModule
from rlhf_lightning.modules.sft import SFTModule

__all__ = ["GRPOModule", "PromptDataModule", "SFTModule"]
__version__ = "0.1.0"
