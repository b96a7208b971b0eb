"""Two CPU processes (torchrun, gloo) train exactly like one process with the same global batch, with
DDP and with FSDP2; FSDP's sharded training state saves and resumes; rank 0 writes a loadable HF dir; the
best step's model (keep_best) and a time budget's agreed step count work across processes.

The test runs this file under torchrun; `worker()` is what each rank executes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import RandomBatches, tiny_model

from lmforge.checkpoint import load_model
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, GLOBAL_BATCH, ACCUM = 4, 4, 2


def run(run_dir, rank: int = 0, world: int = 1, distributed: str = "ddp", resume: str | None = None,
        precision: str = "fp32", activation_checkpointing: bool = False, steps: int = STEPS, grad_accum: int = ACCUM,
        on_trainer=None):
    cfg = TrainConfig(run_dir=str(run_dir), steps=steps, grad_accum=grad_accum, distributed=distributed,
                      progress=False, save_every=2, eval_every=2, device="cpu", resume=resume, precision=precision,
                      activation_checkpointing=activation_checkpointing, keep_best=True, max_minutes=60,
                      optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1))
    # masked prompts: the ranks' micro-batches train on unequal numbers of tokens, each token weighs the same
    data = RandomBatches(GLOBAL_BATCH, 16, seed=1, rank=rank, world=world, prompts=True)
    trainer = Trainer(cfg, tiny_model(seed=3), causal_lm_loss, data, val_data=data.validation())
    if on_trainer:
        on_trainer(trainer)
    return trainer.fit()


def gradient_syncs(run_dir, rank: int, world: int, mode: str, grad_accum: int) -> int:
    """The gradient collectives of a 2-step run: DDP's all-reduces (bucket hand-offs, counted by a comm
    hook), FSDP's reduce-scatters. The same with 1 and with 2 micro-batches a step when only the last
    micro-batch's backward communicates (DDP no_sync, FSDP set_requires_gradient_sync)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = []

    def counting(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    if mode == "ddp":
        run(run_dir, rank, world, mode, steps=2, grad_accum=grad_accum,
            on_trainer=lambda trainer: trainer.model.register_comm_hook(None, counting))
        return len(calls)
    dist = torch.distributed
    name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    original = getattr(dist, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(dist, name, counted)
    try:
        run(run_dir, rank, world, mode, steps=2, grad_accum=grad_accum)
    finally:
        setattr(dist, name, original)
    return len(calls)


def overflowing_scaler(trainer) -> None:
    """fp16 (autocast + torch.amp's grad scaler) from a loss scale at which steps 1 and 2 overflow: every rank
    must skip them (under FSDP each holds a shard of the gradients, and of the infs)."""
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**21)


def worker(mode: str, out: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out_dir = Path(out)
    result = run(out_dir / "run", rank, world, mode)
    report = {"losses": [h["loss"] for h in result.history], "grad_norms": [h["grad_norm"] for h in result.history],
              "val_loss": result.val_loss}
    if mode == "fsdp":  # resume the sharded state from the middle of the run, in a new run directory
        resumed = run(out_dir / "resumed", rank, world, mode, resume=str(out_dir / "run" / "checkpoint-000002"))
        report["resumed_losses"] = [h["loss"] for h in resumed.history]
    # bf16-pure: fp32 master weights beside bf16 ones under DDP; FSDP's MixedPrecisionPolicy under FSDP
    # (there with activation checkpointing too, which recomputes each sharded block in backward)
    bf16 = run(out_dir / "bf16", rank, world, mode, precision="bf16-pure", activation_checkpointing=mode == "fsdp")
    report["bf16_losses"] = [h["loss"] for h in bf16.history]
    fp16 = run(out_dir / "fp16", rank, world, mode, precision="fp16", on_trainer=overflowing_scaler)
    report["fp16_losses"] = [h["loss"] for h in fp16.history]
    report["fp16_scales"] = [h["loss_scale"] for h in fp16.history]
    report["gradient_syncs"] = [gradient_syncs(out_dir / f"sync{k}", rank, world, mode, k) for k in (1, 2)]
    if rank == 0:
        (out_dir / "report.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single") / "run")


@pytest.fixture(scope="module")
def single_bf16(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single") / "bf16", precision="bf16-pure")


@pytest.fixture(scope="module")
def single_fp16(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single") / "fp16", precision="fp16", on_trainer=overflowing_scaler)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, single, single_bf16, single_fp16, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           __file__, mode, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    expected = [h["loss"] for h in single.history]
    torch.testing.assert_close(report["losses"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(report["grad_norms"], [h["grad_norm"] for h in single.history], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(report["val_loss"], single.val_loss, rtol=1e-5, atol=1e-5)
    # Rank 0 wrote one full HF model directory with the same weights as the single process.
    # The same for the best step's model (keep_best), which `final` is.
    assert (tmp_path / "run" / "final").resolve().name == single.model_dir.name == f"best-{single.final_step:06d}"
    for checkpoint in (f"checkpoint-{STEPS:06d}", "final"):
        ours, reference = load_model(tmp_path / "run" / checkpoint), load_model(single.run_dir / checkpoint)
        for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(report["bf16_losses"], [h["loss"] for h in single_bf16.history], rtol=2e-2, atol=0)
    torch.testing.assert_close(report["fp16_losses"], [h["loss"] for h in single_fp16.history], rtol=5e-3, atol=0)
    assert report["fp16_scales"] == [h["loss_scale"] for h in single_fp16.history] == [2.0**20, 2.0**19, 2.0**19,
                                                                                       2.0**19]
    if mode == "fsdp":
        torch.testing.assert_close(report["resumed_losses"], expected[2:], rtol=1e-5, atol=1e-5)
    # gradient accumulation communicates gradients once a step, on the last micro-batch
    one, two = report["gradient_syncs"]
    assert one > 0 and two == one, report["gradient_syncs"]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
