"""`lmforge quickstart`: the whole life cycle on the built-in data (the works of Shakespeare).

    1. build the `tiny` preset, save it as a Hugging Face model directory, reload it and check the
       reloaded model gives identical logits; print its size and FLOPs per token
    2. train a byte-level BPE tokenizer on the corpus
    3. tokenize the corpus into pretraining shards, with a held-out validation split
    4. pretrain the `tiny` model (a few minutes on 2 CPU cores); print validation bits per byte,
       the loss curve and a short generated sample
    5. print the commands that chat with, serve and generate from the model just trained

Every stage writes below --out-dir, and each is also a command of its own (`lmforge tokenizer`,
`lmforge prepare`, `lmforge pretrain`, ...): this file only strings them together.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.config import preset
from lmforge.data.pretrain import prepare
from lmforge.infer.llm import LLM
from lmforge.model import build_model, flops_per_token, num_parameters
from lmforge.settings import parse_args
from lmforge.tokenizer import train_tokenizer
from lmforge.train import pretrain
from lmforge.train.trainer import OptimConfig, TrainConfig


@dataclass
class QuickstartConfig:
    out_dir: str = field(default="runs/quickstart", metadata={"help": "where every stage writes"})
    preset: str = field(default="tiny", metadata={"help": "model size to build and pretrain"})
    vocab_size: int = field(default=6400, metadata={"help": "BPE vocabulary size"})
    steps: int = field(default=1000, metadata={"help": "pretraining steps", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "sequences per step", "min": 1})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence", "min": 1})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate", "min": 0})
    precision: str = field(default="bf16", metadata={
        "help": "fp32 | bf16 (autocast; faster on CPUs with AVX512-BF16 or AMX)"})
    prompt: str = field(default="ROMEO:\n", metadata={"help": "the sample's prompt"})
    seed: int = 0


def step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def build_save_reload(cfg: QuickstartConfig) -> Path:
    model_cfg = preset(cfg.preset, vocab_size=cfg.vocab_size)
    model = build_model(model_cfg, seed=cfg.seed).eval()
    path = save_model(model, Path(cfg.out_dir) / "init")
    reloaded = load_model(path).eval()
    x = torch.randint(0, model_cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        same = torch.equal(model(x).logits, reloaded(x).logits)
    if not same:
        raise RuntimeError(f"{path}: the reloaded model's logits differ from the saved model's")
    print(f"    {cfg.preset}: {num_parameters(model) / 1e6:.2f}M parameters, "
          f"{flops_per_token(model_cfg, cfg.seq_len) / 1e6:.1f} MFLOPs per training token at length {cfg.seq_len}")
    print(f"    saved to {path}, reloaded: logits identical")
    return path


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(QuickstartConfig, argv, prog="lmforge quickstart", description=__doc__)
    out = Path(cfg.out_dir)
    start = time.time()

    step(1, f"build the '{cfg.preset}' model, save it as a Hugging Face directory, reload it")
    build_save_reload(cfg)

    step(2, f"train a {cfg.vocab_size}-token byte-level BPE tokenizer on the built-in Shakespeare corpus")
    tokenizer = train_tokenizer(["builtin:shakespeare"], cfg.vocab_size, out / "tokenizer")
    sample = "To be, or not to be: that is the question."
    print(f"    {out / 'tokenizer'}: {len(tokenizer.encode(sample))} tokens for {sample!r}")

    step(3, "tokenize the corpus into pretraining shards (5% held out for validation)")
    manifest = prepare(out / "tokenizer", ["builtin:shakespeare"], out / "data", val_fraction=0.05)
    print(f"    {out / 'data'}: {manifest.train.tokens:,} training and {manifest.val.tokens:,} validation tokens")

    step(4, f"pretrain '{cfg.preset}' for {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens "
         f"({cfg.precision})")
    result = pretrain.run(pretrain.PretrainConfig(
        model=cfg.preset, data=str(out / "data"), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        train=TrainConfig(run_dir=str(out / "pretrain"), steps=cfg.steps, seed=cfg.seed, precision=cfg.precision,
                          eval_every=max(cfg.steps // 4, 1), save_every=0,
                          optim=OptimConfig(lr=cfg.lr, warmup_steps=cfg.steps // 10))))
    print(f"    validation loss {result.val_loss:.3f}, {result.val_bpb:.3f} bits per byte")
    print(f"    loss curve: {result.loss_curve}")
    text = LLM.load(result.model_dir).generate(cfg.prompt, max_tokens=80, temperature=0.8, top_k=50, seed=cfg.seed)
    print("    sample:\n" + "\n".join("      " + line for line in (cfg.prompt + text).splitlines()))

    model = shlex.quote(str(result.model_dir))
    step(5, "use it")
    print(f"    lmforge generate --model {model} --prompt 'JULIET:' --max-new-tokens 100")
    print(f"    lmforge chat --model {model}")
    print(f"    lmforge serve --model {model} --port 8000   # OpenAI API + web chat at http://127.0.0.1:8000/")
    print(f"\nquickstart done in {time.time() - start:.0f}s")
    return 0
