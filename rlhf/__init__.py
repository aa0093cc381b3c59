"""RLHF toolkit: SFT -> label -> reward model -> PPO on one shared base model with LoRA adapters.

Layout: ``rlhf/`` is the shared core (config, model loader, adapter registry, data loader, outputs,
PPO math and trainer, CLI); ``sft/`` and ``reward/`` are the first two stages; ``label/`` collects
human preference labels.
"""

__version__ = "0.1.0"
