"""QLoRA against LoRA on the bf16 base: peak memory of a training step and the first losses, side by side.

    .venv/bin/python benchmarks/qlora.py                          # small preset, random init, memorisable tokens
    .venv/bin/python benchmarks/qlora.py --model runs/pretrain/final --data runs/data   # a trained model, its shards

Both runs build the model as `lmforge sft --method lora --lora.target-modules all-linear` does (sft.build), one
with `--quant nf4`, and train it with `--train.precision bf16-pure`: the base computes in bf16 (embeddings,
norms and head in bf16 in both runs), the adapters in fp32. The same seeded batches go to both. Memory is
counted as benchmarks/dpo_memory.py counts it: torch's MemTracker over one step after a warm-up step, the peak
of all tensor storages alive (weights, buffers, adapters, their optimizer state, activations, gradients);
`weights_mb` the model's parameters and buffers alone. Data: `--data`, a pretraining shard directory
(`lmforge prepare`; windows drawn at seeded random offsets of its train_*.bin), or else 64 fixed random token
sequences repeated (so the loss falls even from random weights). Last line: one JSON object, "ratio" = bf16-base
LoRA peak / NF4-base LoRA peak. With a model directory, also the peak of tensor memory while its base is loaded
for QLoRA, whole then quantised or layer by layer (`load_peak_mb`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def batches(args, vocab_size: int, steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if args.data:
        manifest = json.loads((Path(args.data) / "manifest.json").read_text())
        tokens = np.concatenate([np.fromfile(f, dtype=manifest["dtype"])
                                 for f in sorted(Path(args.data).glob("train_*.bin"))])
        tokens = torch.from_numpy(tokens.astype(np.int64))
        starts = torch.randint(0, len(tokens) - args.seq_len - 1, (steps, args.batch_size), generator=g)
        rows = [torch.stack([tokens[s:s + args.seq_len + 1] for s in step.tolist()]) for step in starts]
    else:
        pool = torch.randint(0, vocab_size, (64, args.seq_len + 1), generator=g)
        rows = [pool[torch.randint(0, 64, (args.batch_size,), generator=g)] for _ in range(steps)]
    return [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in rows]


def run(args, quant: str) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from lmforge.settings import parse_args_or_raise
    from lmforge.train import sft
    from lmforge.train.objectives import causal_lm_loss
    from lmforge.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = parse_args_or_raise(sft.SFTConfig, [
            "--model", args.model, "--method", "lora", "--quant", quant, "--lora.r", str(args.r),
            "--lora.alpha", str(2 * args.r), "--lora.target-modules", "all-linear", "--train.precision", "bf16-pure",
            "--train.steps", str(args.steps), "--train.optim.lr", str(args.lr), "--train.optim.warmup-steps", "5",
            "--train.run-dir", run_dir, "--train.device", "cpu", "--train.progress", "false",
            "--train.save-every", "0", "--train.eval-every", "0", "--train.seed", "0"])
        vocab = SimpleNamespace(vocab_size=args.vocab_size, eos_id=0, pad_id=0)  # for a preset's config only
        model = sft.build(cfg, vocab, torch.device("cpu"))
        data = batches(args, model.config.vocab_size, args.steps)

        class Batches:
            step = 0

            def __next__(self):
                self.step += 1
                return data[self.step - 1]

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                pass

        trainer = Trainer(cfg.train, model, lambda m, b: causal_lm_loss(m, b, cfg.chunk_size), Batches())
        losses = [trainer.train_step()["loss"]]  # warm-up: the optimizer's state exists from now on
        class Tracker(MemTracker):  # a frozen weight takes no gradient hook (MemTracker would put one on every weight)
            def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
                return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        tracker = Tracker()
        tracker.track_external(model, trainer.optimizer)
        with tracker:
            losses.append(trainer.train_step()["loss"])
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        for _ in range(args.steps - 2):
            losses.append(trainer.train_step()["loss"])
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"peak_mb": round(peak["Total"] / 2**20, 1), "weights_mb": round(weights / 2**20, 1),
            "params_and_buffers_mb": round((peak[_MemRefType.PARAM] + peak[_MemRefType.BUFFER]) / 2**20, 1),
            "losses": [round(float(v), 4) for v in losses]}


def load_peaks(model_dir: str) -> dict[str, float]:
    """The peak of tensor memory (MB, MemTracker) while the base is loaded for QLoRA: whole then quantised (how
    sft did it), or layer by layer (load_model's linear_hook, how sft does it). Resident memory would count the
    safetensors file's mapped pages too, which the OS can drop."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from lmforge.checkpoint import load_model
    from lmforge.model.nf4 import NF4Linear, quantize_linears_nf4

    peaks = {}
    for way in ("whole", "by-layer"):
        tracker = MemTracker()
        with tracker:
            model = quantize_linears_nf4(load_model(model_dir)) if way == "whole" else \
                load_model(model_dir, linear_hook=lambda linear: NF4Linear(linear))
        peaks[way] = round(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / 2**20, 1)
        del model
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small", help="a preset (random weights) or a model directory")
    parser.add_argument("--data", default=None, help="a pretraining shard directory (lmforge prepare)")
    parser.add_argument("--vocab-size", type=int, default=6400, help="a preset's vocabulary")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, quant in (("bf16", "none"), ("nf4", "nf4")):
        results[name] = run(args, quant)
        r = results[name]
        print(f"LoRA on the {name} base ({args.model}): peak {r['peak_mb']} MB of tensors in a step, weights "
              f"{r['weights_mb']} MB; loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} in {args.steps} steps",
              flush=True)
    if Path(args.model).is_dir():
        results["load_peak_mb"] = load_peaks(args.model)
        print(f"loading the base for QLoRA peaks at {results['load_peak_mb']['whole']} MB of tensors whole then "
              f"quantised, {results['load_peak_mb']['by-layer']} MB layer by layer", flush=True)
    gap = [abs(a - b) for a, b in zip(results["bf16"]["losses"], results["nf4"]["losses"])]
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, **results,
                      "max_loss_gap": round(max(gap), 4),
                      "weights_ratio": round(results["bf16"]["weights_mb"] / results["nf4"]["weights_mb"], 3),
                      "ratio": round(results["bf16"]["peak_mb"] / results["nf4"]["peak_mb"], 3)}))


if __name__ == "__main__":
    main()
