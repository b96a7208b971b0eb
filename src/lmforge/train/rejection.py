"""`lmforge rejection`: rejection sampling. Generate n completions per prompt through the Engine, score them
with a reward function, and keep the best (or all that score above a threshold) as SFT conversations.

    lmforge rejection --model runs/sft/final --prompts runs/tasks/prompts.jsonl --n 8 --out runs/rs/sft.jsonl
    lmforge sft --model runs/sft/final --data runs/rs/sft.jsonl ...      # rejection-sampling fine-tuning

1. the prompts: RL prompt files (data.prompts: {"prompt", "answer"}, {"messages", "answer"} or GSM8K's
   {"question", "answer"}), each rendered with the model's chat template
2. the samples: n per prompt, sharing one prefill, all prompts continuously batched by the one Engine
3. the rewards: a reward function (train.rewards: `exact_answer`, `format`, or a user's `module:function`
   with TRL's signature)
4. the output: `--out`, SFT conversations {"messages": prompt + [the kept completion]} that `lmforge sft`
   reads; with `--pairs-out`, also preference pairs {"prompt", "chosen", "rejected"} of each prompt's best
   and worst completions where the best scores higher, the model's own right and wrong answers for
   `lmforge dpo`; and OUT.summary.json: mean reward, the share of prompts with a kept completion (pass@n
   with exact_answer), counts.
Rejection sampling (best-of-n) fine-tuning: Touvron et al. 2023 (Llama 2, section 3.2.3); on reasoning with
checkable answers, Yuan et al. 2023 (RFT), Zelikman et al. 2022 (STaR).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.data.formats import DataStats
from lmforge.data.prompts import RLPrompt, read_prompts
from lmforge.infer.engine import Engine
from lmforge.infer.llm import encode_prompts
from lmforge.infer.request import Output
from lmforge.infer.sampling import SamplingParams
from lmforge.settings import check_ranges, parse_args
from lmforge.train.rewards import load_reward_function, score


@dataclass
class RejectionConfig:
    model: str = field(default="runs/sft/final", metadata={"help": "the model directory to sample from"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir (default: the model dir)"})
    prompts: list[str] = field(default_factory=list, metadata={"help": "RL prompt files (jsonl, parquet, globs)"})
    reward: str = field(default="exact_answer", metadata={
        "help": "exact_answer | format | length | a reward model's directory | module:function (TRL's "
                "reward-function signature)"})
    n: int = field(default=8, metadata={"help": "completions per prompt", "min": 1})
    keep: Literal["best", "all"] = field(default="best", metadata={
        "help": "best: each prompt's best completion; all: every completion above the threshold"})
    threshold: float = field(default=0.0, metadata={"help": "keep only completions whose reward is above this"})
    out: str = field(default="runs/rejection/sft.jsonl", metadata={"help": "the SFT conversations written"})
    pairs_out: str | None = field(default=None, metadata={
        "help": "also write preference pairs (each prompt's best and worst completions) here"})
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts", "min": 1})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per completion", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy)", "min": 0})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens (0 = off)", "min": 0})
    seed: int = field(default=0, metadata={"help": "prompt i draws its samples with seed + i * n + j"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights and cache dtype"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    max_batch_size: int = field(default=32, metadata={"help": "sequences decoded together", "min": 1})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad records instead of stopping"})


def sample(engine: Engine, prompts: list[RLPrompt], cfg: RejectionConfig) -> list[list[Output]]:
    """n completions of every prompt, all prompts submitted at once (continuous batching), each prompt's
    samples seeded apart from the others'."""
    ids = encode_prompts(engine.tokenizer, [p.messages for p in prompts])
    params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=cfg.top_k, n=cfg.n, seed=cfg.seed + i * cfg.n) for i in range(len(ids))]
    return engine.generate(ids, params)


def select(prompts: list[RLPrompt], completions: list[list[str]], rewards: list[list[float | None]],
           cfg: RejectionConfig) -> tuple[list[dict], list[dict]]:
    """(SFT conversations, preference pairs) from the scored completions (see the module docstring)."""
    conversations, pairs = [], []
    for prompt, texts, values in zip(prompts, completions, rewards):
        scored = [(v, t) for v, t in zip(values, texts) if v is not None]
        if not scored:
            continue
        above = [(v, t) for v, t in scored if v > cfg.threshold]
        kept = [max(above, key=lambda vt: vt[0])] if cfg.keep == "best" and above else above
        conversations += [{"messages": prompt.messages + [{"role": "assistant", "content": t}]} for _, t in kept]
        best, worst = max(scored, key=lambda vt: vt[0]), min(scored, key=lambda vt: vt[0])
        if best[0] > worst[0]:
            pairs.append({"prompt": prompt.messages, "chosen": [{"role": "assistant", "content": best[1]}],
                          "rejected": [{"role": "assistant", "content": worst[1]}]})
    return conversations, pairs


def run(cfg: RejectionConfig) -> dict:
    check_ranges(cfg)
    if not cfg.prompts:
        raise ValueError("prompts: give one or more prompt files")
    function = load_reward_function(cfg.reward, cfg.max_new_tokens)
    stats = DataStats()
    prompts = list(read_prompts(cfg.prompts, cfg.skip_bad, stats))[:cfg.max_prompts]
    if not prompts:
        raise ValueError(f"prompts: no prompt in {cfg.prompts} ({stats.summary()})")
    engine = Engine.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device, tokenizer=cfg.tokenizer,
                                    max_batch_size=max(cfg.max_batch_size, cfg.n))
    outputs = sample(engine, prompts, cfg)
    completions = [[o.text for o in samples] for samples in outputs]
    rewards = [score(function, [p.messages] * len(texts), [[{"role": "assistant", "content": t}] for t in texts],
                     {"answer": [p.answer] * len(texts), "completion_ids": [o.token_ids for o in samples]})
               for p, texts, samples in zip(prompts, completions, outputs)]
    conversations, pairs = select(prompts, completions, rewards, cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")
    if cfg.pairs_out:
        Path(cfg.pairs_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.pairs_out).write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    values = [v for row in rewards for v in row if v is not None]
    summary = {"prompts": len(prompts), "samples": sum(map(len, completions)), "kept": len(conversations),
               "pairs": len(pairs), "mean_reward": sum(values) / max(len(values), 1),
               "prompts_with_a_kept_completion": sum(any(v is not None and v > cfg.threshold for v in row)
                                                     for row in rewards) / len(prompts),
               "skipped_records": stats.skipped, "config": asdict(cfg)}
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(RejectionConfig, argv, prog="lmforge rejection",
                     description="Rejection sampling: n completions per prompt, scored, the best kept as SFT data.")
    summary = run(cfg)
    print(f"{summary['prompts']} prompts, {summary['samples']} samples, mean reward {summary['mean_reward']:.3f}; "
          f"kept {summary['kept']} ({summary['prompts_with_a_kept_completion']:.1%} of prompts) -> {cfg.out}"
          + (f"; {summary['pairs']} pairs -> {cfg.pairs_out}" if cfg.pairs_out else ""))
    return 0
