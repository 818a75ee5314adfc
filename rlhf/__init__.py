"""Alignment stages: reward model, DPO family, PPO and GRPO."""
