"""LightningModules: SFT warm start, GRPO, PPO, reward model."""
