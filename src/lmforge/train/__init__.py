"""Training: one loop (trainer.py) for every stage, the objectives it optimises (objectives.py), and one
short file per stage (pretrain.py, sft.py, ...)."""
