"""Data: file formats and readers (formats), pretraining shards and loader (pretrain), fine-tuning
samples (sft), preference pairs (preference) and RL prompts (prompts)."""
