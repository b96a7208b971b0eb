"""Data: file formats and readers (formats), pretraining shards and loader (pretrain), fine-tuning
samples (sft), preference pairs (preference) and RL prompts (prompts); built-in generated data: arithmetic
word problems (arithmetic, codeact) and synthetic images with questions and captions (shapes)."""
