"""Alternatives to PPO on the shared base: DPO (methods/dpo.py), GRPO and RLOO (methods/online.py)."""
