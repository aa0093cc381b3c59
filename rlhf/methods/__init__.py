"""Alternatives to PPO on the shared base: DPO (rlhf/methods/dpo.py), GRPO and RLOO (rlhf/methods/online.py)."""
