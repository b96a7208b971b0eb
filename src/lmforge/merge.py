"""`lmforge merge`: fold a LoRA/DoRA adapter (PEFT format) into its base model and write a plain
Hugging Face model directory, which loads anywhere without PEFT.

    lmforge merge --model runs/base --adapter runs/sft-lora/final --out runs/merged [--dtype bfloat16]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lmforge.checkpoint import DTYPES, load_model, load_reward_model, save_model
from lmforge.files import read_json
from lmforge.model.lora import load_adapter, merge_lora
from lmforge.settings import parse_args


@dataclass
class MergeConfig:
    model: str = field(default="", metadata={"help": "the base model's HF directory"})
    adapter: str = field(default="", metadata={"help": "a PEFT LoRA/DoRA adapter directory"})
    out: str = field(default="", metadata={"help": "where to write the merged HF directory"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "weights dtype on disk; auto = the base model's"})


def base_dtype(model_dir: Path) -> torch.dtype:
    """The dtype config.json gives the weights (load_model has read the file); float32 if it names none."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(name, torch.float32) if isinstance(name, str) else torch.float32


def merge(model_dir: str | Path, adapter_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge in fp32 (the sum W + s*BA keeps its low bits), then save in `dtype` (default: the base's)."""
    model_dir = Path(model_dir)
    # a reward model's adapter (task SEQ_CLS) holds its score head too: the base is its body under that head
    reward = read_json(Path(adapter_dir) / "adapter_config.json").get("task_type") == "SEQ_CLS"
    model = (load_reward_model if reward else load_model)(model_dir, dtype=torch.float32)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    return save_model(model, out, tokenizer_dir=model_dir, dtype=dtype or base_dtype(model_dir))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(MergeConfig, argv, prog="lmforge merge", description=__doc__)
    for name in ("model", "adapter", "out"):
        if not getattr(args, name):
            print(f"lmforge merge: error: --{name} is required", file=sys.stderr)
            return 2
    out = merge(args.model, args.adapter, args.out, None if args.dtype == "auto" else DTYPES[args.dtype])
    print(out)
    return 0
