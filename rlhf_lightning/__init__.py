"""rlhf_lightning: PyTorch Lightning modules for RL fine-tuning of language models."""

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule, StepwiseDataModule
from rlhf_lightning.iterative import IterativeRewardModelCallback
from rlhf_lightning.iterative_prm import IterativeProcessRewardModelCallback
from rlhf_lightning.modules.grpo import GRPOModule
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.process_reward_model import ProcessRewardModel
from rlhf_lightning.modules.reward_model import RewardModel, RewardModelScorer
from rlhf_lightning.modules.sft import SFTModule

__all__ = ["GRPOModule", "IterativeProcessRewardModelCallback", "IterativeRewardModelCallback", "PPOModule",
           "PreferenceDataModule", "ProcessRewardModel", "PromptDataModule", "RewardModel", "RewardModelScorer",
           "SFTModule", "StepwiseDataModule"]
__version__ = "0.1.0"
