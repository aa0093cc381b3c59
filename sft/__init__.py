"""Stage 1: supervised fine-tuning on prompt -> response rows with TRL's SFTTrainer."""
