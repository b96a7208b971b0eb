"""Peak memory of a DPO step on B pairs against an SFT step on 2B sequences of the same lengths, side by side.

    .venv/bin/python benchmarks/dpo_memory.py                     # small preset, 4 pairs of 256 tokens, fp32
    .venv/bin/python benchmarks/dpo_memory.py --pairs 8 --seq-len 512 --preset tiny

Each step runs in a process of its own (the allocator keeps what a step freed, which would hide the second
one's peak): the model and the Trainer are built, one step warms up, then the peak resident memory is reset
(/proc/self/clear_refs) and one more step measured. `step_mb` is that step's peak over the memory held before
it (activations, gradients, logits): what the objective costs; `peak_mb` the process's whole peak. Last line:
one JSON object, "ratio" = SFT step_mb / DPO step_mb (the issue's target: DPO at most 1.15x SFT, ratio >= 0.87).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(kind: str, preset: str, pairs: int, seq_len: int) -> dict:
    import torch

    from lmforge.config import preset as model_preset
    from lmforge.model import build_model
    from lmforge.settings import parse_args_or_raise
    from lmforge.train import dpo
    from lmforge.train.objectives import causal_lm_loss
    from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer

    torch.manual_seed(0)
    model = build_model(model_preset(preset))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2 * pairs, seq_len))
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # a prompt of a quarter of the sequence, not trained on
    if kind == "sft":
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        batch, loss_fn = {"input_ids": ids, "labels": shifted}, causal_lm_loss
    else:
        cfg = parse_args_or_raise(dpo.DPOConfig, [])
        batch = {"chosen_input_ids": ids[:pairs], "rejected_input_ids": ids[pairs:], "chosen_labels": labels[:pairs],
                 "rejected_labels": labels[pairs:], "ref_chosen_logps": torch.zeros(pairs),
                 "ref_rejected_logps": torch.zeros(pairs)}
        loss_fn = lambda m, b: dpo.preference_loss(m, b, cfg)  # noqa: E731

    class Same:
        def __next__(self):
            return batch

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with tempfile.TemporaryDirectory() as run_dir:
        train = TrainConfig(run_dir=run_dir, steps=2, progress=False, device="cpu", save_every=0, eval_every=0,
                            optim=OptimConfig(warmup_steps=0))
        trainer = Trainer(train, model, loss_fn, Same())
        trainer.train_step()  # warm-up: the optimizer's state exists from now on
        before = rss_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak resident memory
        trainer.train_step()
        peak = rss_mb("VmHWM")
    return {"step_mb": round(peak - before, 1), "peak_mb": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--worker", choices=["sft", "dpo"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.pairs, args.seq_len)))
        return
    results = {}
    for kind in ("sft", "dpo"):
        done = subprocess.run([sys.executable, __file__, "--worker", kind, "--preset", args.preset, "--pairs",
                               str(args.pairs), "--seq-len", str(args.seq_len)], capture_output=True, text=True,
                              check=True)
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        label = f"{2 * args.pairs} sequences" if kind == "sft" else f"{args.pairs} pairs"
        print(f"{kind} step on {label} of {args.seq_len} tokens ({args.preset}): {results[kind]['step_mb']} MB "
              f"over what it held before (process peak {results[kind]['peak_mb']} MB)", flush=True)
    print(json.dumps({"preset": args.preset, "pairs": args.pairs, "seq_len": args.seq_len, **results,
                      "dpo_over_sft": round(results["dpo"]["step_mb"] / results["sft"]["step_mb"], 3),
                      "ratio": round(results["sft"]["step_mb"] / results["dpo"]["step_mb"], 3)}))


if __name__ == "__main__":
    main()
