"""The first 20 losses of `tiny` pretraining on a fixed seed are pinned in tests/golden/tiny_pretrain.json
(as torchtitan keeps loss files), so that any change to the math of a step shows at once: the model, its
initialisation, the data order, the loss, the optimizer, the schedule. On one machine a run repeats them
to the last bit (with 1 or 2 threads, with the C kernels or PyTorch's ops: measured within 1.2e-7), so the
tolerance, 1e-4 relative, only allows for other CPUs rounding their matmuls differently; a change to the
math moves them by far more (one more warmup step: 1e-2).

After a change that should move them, regenerate the file: `python tests/test_golden_loss.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from train_helpers import make_corpus

from lmforge.settings import parse_args_or_raise
from lmforge.train import pretrain

GOLDEN = Path(__file__).parent / "golden" / "tiny_pretrain.json"

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_losses(directory: Path) -> list[float]:
    """20 steps of the `tiny` preset on 120 KB of Shakespeare (vocabulary 300), seed 0, fp32."""
    (directory / "corpus").mkdir(parents=True, exist_ok=True)
    _, data = make_corpus(directory / "corpus")
    cfg = parse_args_or_raise(pretrain.PretrainConfig, [
        "--model", "tiny", "--data", str(data), "--seq-len", "64", "--batch-size", "4", "--eval-batches", "1",
        "--train.steps", "20", "--train.optim.warmup-steps", "5", "--train.run-dir", str(directory / "run"),
        "--train.eval-every", "0", "--train.save-every", "0", "--train.progress", "false", "--train.device", "cpu",
        "--train.peak-flops", "1e11"])
    return [row["loss"] for row in pretrain.run(cfg).history]


def test_tiny_pretraining_losses_match_the_golden_file(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    losses = tiny_losses(tmp_path)
    assert len(losses) == len(golden["losses"]) == 20
    for step, (got, pinned) in enumerate(zip(losses, golden["losses"]), start=1):
        assert got == pytest.approx(pinned, rel=1e-4), f"step {step}: loss {got}, pinned {pinned}"


if __name__ == "__main__":  # regenerate the golden file
    import tempfile

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        losses = tiny_losses(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"what": "losses of steps 1-20 of tests/test_golden_loss.py's tiny_losses",
                                  "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
