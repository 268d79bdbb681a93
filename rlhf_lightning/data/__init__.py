"""Data: prompts for RL (and prompt/completion pairs for SFT), preference pairs for reward models, built-in tasks.

- `rows.py`: loading rows from files, dataset folders and hub ids; checking each with its file and line.
- `prompts.py`: `PromptDataModule` (left-padded prompt batches) and its resumable sampler.
- `preference.py`: `PreferenceDataModule` (chosen/rejected pairs as the reward model reads them).
- `stepwise.py`: `StepwiseDataModule` (TRL's stepwise rows as the process reward model reads them).
- `negatives.py`: synthetic rejected answers for the built-in preference pairs.
- `tasks.py`: the built-in tasks (generated prompts with exact answers and verifiers).
"""

from .preference import PreferenceDataModule
from .prompts import PromptDataModule
from .stepwise import StepwiseDataModule

__all__ = ["PreferenceDataModule", "PromptDataModule", "StepwiseDataModule"]
