"""`lmforge <command> ...`: each command is one function `main(argv)` in the module that does it.

Modules are imported only when their command runs, so `lmforge generate` never pays for the
training code, and a missing optional extra only matters to the command that needs it.

Bad input ends a command with one line, `lmforge: error: MESSAGE`, and exit status 1: the errors that
input causes (ValueError and its kinds: DataError, CheckpointError, ModelConfigError, ...; OSError: a
file missing or unreadable; FloatingPointError: a non-finite loss) carry a message naming the file, line or field, and a
traceback would only bury it. LMFORGE_DEBUG=1 shows the traceback too.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, one-line help). Each module defines `main(argv: list[str]) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("lmforge.quickstart", "the whole life cycle on the built-in data"),
    "tokenizer": ("lmforge.tokenizer", "train a byte-level BPE tokenizer with chat special tokens"),
    "prepare": ("lmforge.data.pretrain", "tokenize text into memory-mapped pretraining shards"),
    "tasks": ("lmforge.data.arithmetic", "write the built-in arithmetic word problems (GSM8K format) as JSONL"),
    "shapes": ("lmforge.data.shapes", "write the built-in synthetic images (shapes, colours, counts, positions, "
               "words) with questions and captions as chat JSONL"),
    "pretrain": ("lmforge.train.pretrain", "pretrain a preset or an HF model dir on prepared shards"),
    "sft": ("lmforge.train.sft", "supervised fine-tuning: full, LoRA, DoRA or chosen layers"),
    "vlm": ("lmforge.train.vlm", "train a LLaVA model: projector alignment on captions, then visual instruction SFT"),
    "dpo": ("lmforge.train.dpo", "preference optimisation: DPO and its family (TRL's losses), KTO"),
    "reward": ("lmforge.train.reward", "reward model: a scalar score head trained on preference pairs"),
    "distill": ("lmforge.train.distill", "knowledge distillation from a teacher: offline KL/JSD or on-policy (GKD)"),
    "rejection": ("lmforge.train.rejection", "rejection sampling: n completions per prompt, the best kept as SFT data"),
    "grpo": ("lmforge.train.grpo", "RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, GSPO"),
    "rloo": ("lmforge.train.rloo", "RL with verifiable rewards: RLOO (leave-one-out baseline, KL in the reward)"),
    "ppo": ("lmforge.train.ppo", "RLHF with PPO: a value model, per-token KL penalty, GAE, clipped losses"),
    "eval": ("lmforge.eval.evaluate", "evaluate a model: bits per byte, multiple choice, exact match, code (pass@k)"),
    "merge": ("lmforge.merge", "fold a LoRA/DoRA adapter into its base model: a plain HF dir"),
    "quantize": ("lmforge.quantize", "weight-only int8/int4 (round to nearest or AWQ), a compressed-tensors HF dir"),
    "export": ("lmforge.export", "a model as a GGUF file for llama.cpp (f32 to 4-bit), or with an Ollama Modelfile"),
    "generate": ("lmforge.infer.generate", "print a completion of a prompt (only the completion, on stdout)"),
    "chat": ("lmforge.infer.chat", "chat with a model in the terminal, streaming"),
    "serve": ("lmforge.infer.serve", "OpenAI-compatible HTTP API and web chat over a model directory"),
    "agent": ("lmforge.agent", "a CodeAct agent: the model writes Python, a sandboxed interpreter runs it"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lmforge <command> [options]   (lmforge <command> --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lmforge: unknown command '{command}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except (ValueError, OSError, FloatingPointError) as error:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {' '.join(str(error).split(chr(10)))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
