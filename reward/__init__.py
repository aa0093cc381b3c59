"""Stage 3: a reward model (LoRA adapter + scalar score head) trained on preference pairs."""
