"""`lmforge dpo` against TRL itself (one DPOTrainer step on the same tiny model and batch gives the same loss
and the same updated weights), every loss against the formulas of its paper as TRL documents them, the
reference when training starts from an adapter, exact resume, and the command on the built-in tasks."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_model

from lmforge import cli
from lmforge.checkpoint import load_model, save_model
from lmforge.model.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from lmforge.settings import parse_args_or_raise
from lmforge.tokenizer import Tokenizer
from lmforge.train import dpo
from lmforge.train.objectives import kto_loss, pair_loss, sequence_logps
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]
# Adam's first step moves a weight by lr * g / (|g| + eps), whose slope at g = 0 is lr / eps: with eps 1e-8
# the last bit of a gradient of ~1e-9 (embedding rows summed in another order) moves a weight by 1% of lr.
# Both trainers take eps 1e-4 here, so that rounding stays rounding and the weights can be held to 1e-6.
ADAM_EPS = 1e-4
PAIRS = [{"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": " It is 5, I think."},
         {"prompt": "Name a play:", "chosen": " Hamlet", "rejected": " Cats and dogs"}]


def tiny_model_dir(directory, tokenizer, seed: int):
    save_model(tiny_model(seed=seed, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False),
               directory, tokenizer_dir=tokenizer)
    return directory


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("dpo") / "model", corpus[0], seed=5)


@pytest.fixture(scope="module")
def reference_dir(corpus, tmp_path_factory):
    """Another model as the reference, so that the first step's loss is not simply log 2."""
    return tiny_model_dir(tmp_path_factory.mktemp("dpo") / "reference", corpus[0], seed=6)


def trl_step(model_dir, reference_dir, tmp_path, loss_type: list[str]):
    """One DPOTrainer step (fp32, AdamW, lr 1e-3): its batch, loss and updated weights."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, learning_rate=1e-3,
                         max_steps=1, bf16=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                         beta=0.1, loss_type=loss_type, seed=0, gradient_checkpointing=False, adam_epsilon=ADAM_EPS)
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args,
                             train_dataset=datasets.Dataset.from_list(PAIRS),
                             processing_class=AutoTokenizer.from_pretrained(model_dir))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    loss = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
    return batch, loss, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"], ["sigmoid", "sft"]])
def test_one_step_equals_trls_dpo_trainer(model_dir, reference_dir, tmp_path, loss_type):
    batch, trl_loss, trl_weights = trl_step(model_dir, reference_dir, tmp_path, loss_type)
    half = batch["input_ids"].shape[0] // 2
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ours = {"chosen_input_ids": batch["input_ids"][:half], "rejected_input_ids": batch["input_ids"][half:],
            "chosen_labels": labels[:half], "rejected_labels": labels[half:]}
    model, reference = load_model(model_dir), load_model(reference_dir)
    with torch.no_grad():
        ref_c, _, _ = sequence_logps(reference, ours["chosen_input_ids"], ours["chosen_labels"])
        ref_r, _, _ = sequence_logps(reference, ours["rejected_input_ids"], ours["rejected_labels"])
    ours.update(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    cfg = parse_args_or_raise(dpo.DPOConfig, ["--loss-type", *loss_type, "--beta", "0.1"])

    class OneBatch:
        def __next__(self):
            return ours

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    train = TrainConfig(run_dir=str(tmp_path / "ours"), steps=1, save_every=0, eval_every=0, progress=False,
                        device="cpu", optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, beta2=0.999,
                                                        eps=ADAM_EPS, min_lr_ratio=1.0, grad_clip=1.0))
    trainer = Trainer(train, model, lambda m, b: dpo.preference_loss(m, b, cfg), OneBatch())
    row = trainer.train_step()
    assert row["loss"] == pytest.approx(trl_loss, rel=1e-5) and abs(row["loss"] - math.log(2)) > 1e-3
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), trl_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def hand_checkable():
    """Two pairs whose log-probabilities (summed) and lengths are round numbers."""
    logps = (torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]))
    counts = (torch.tensor([5.0, 2.0]), torch.tensor([4.0, 3.0]))
    ref = (torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5]))
    return logps, counts, ref


@pytest.mark.parametrize("loss_type, expected", [
    # Δ = (log π/π_ref)(chosen) - (rejected) = (1 - (-0.5), 0.5 - 0.5) = (1.5, 0)
    ("sigmoid", lambda b: [-math.log(1 / (1 + math.exp(-b * 1.5))), math.log(2)]),
    ("hinge", lambda b: [max(0.0, 1 - b * 1.5), 1.0]),
    # per-token log-ratios: chosen 1/5, rejected -0.5/4; 0.5/2, 0.5/3
    ("ipo", lambda b: [(0.2 + 0.125 - 1 / (2 * b)) ** 2, (0.25 - 0.5 / 3 - 1 / (2 * b)) ** 2]),
    ("sigmoid_norm", lambda b: [math.log1p(math.exp(-b * 0.325)), math.log1p(math.exp(-b * (0.25 - 0.5 / 3)))]),
    # SimPO: avg chosen -2, -2; avg rejected -3, -1; gamma 0.5
    ("simpo", lambda b: [math.log1p(math.exp(-(b * 1.0 - 0.5))), math.log1p(math.exp(-(b * -1.0 - 0.5)))]),
    ("cpo", lambda b: [math.log1p(math.exp(-b * 2.0)), math.log1p(math.exp(-b * -1.0))]),
    ("sft", lambda b: [14 / 7, 14 / 7]),
])
def test_pair_losses_equal_their_formulas(loss_type, expected):
    logps, counts, ref = hand_checkable()
    got = pair_loss(loss_type, logps, counts, ref, beta=0.5)
    torch.testing.assert_close(got, torch.tensor(expected(0.5)), rtol=1e-6, atol=1e-7)


def test_label_smoothing_orpo_and_kto_equal_their_formulas():
    logps, counts, ref = hand_checkable()
    eps, beta, delta = 0.1, 0.5, torch.tensor([1.5, 0.0])
    sig = F.logsigmoid
    torch.testing.assert_close(pair_loss("sigmoid", logps, counts, ref, beta, eps),
                               -(1 - eps) * sig(beta * delta) - eps * sig(-beta * delta))
    torch.testing.assert_close(pair_loss("robust", logps, counts, ref, beta, eps),
                               (-(1 - eps) * sig(beta * delta) + eps * sig(-beta * delta)) / (1 - 2 * eps))
    avg_c, avg_r = torch.tensor([-2.0, -2.0]), torch.tensor([-3.0, -1.0])
    log_odds = (avg_c - avg_r) - (torch.log(1 - avg_c.exp()) - torch.log(1 - avg_r.exp()))
    torch.testing.assert_close(pair_loss("orpo", logps, counts, None, beta), -avg_c - beta * sig(log_odds))
    # KTO: z = max(0, mean(kl_logps - ref_kl)) = max(0, (1 + 3) / 2) = 2
    losses, z = kto_loss(torch.tensor([-5.0, -6.0]), torch.tensor([-6.0, -5.0]), torch.tensor([-4.0, -2.0]),
                         torch.tensor([-5.0, -5.0]), torch.tensor([True, False]), beta, 2.0, 3.0)
    assert z.item() == 2.0
    torch.testing.assert_close(losses, torch.tensor([2.0 * (1 - torch.sigmoid(torch.tensor(beta * (1.0 - 2.0)))),
                                                     3.0 * (1 - torch.sigmoid(torch.tensor(beta * (2.0 + 1.0))))]))


def dpo_args(model_dir, tasks, run_dir, *extra):
    return ["dpo", "--model", str(model_dir), "--data", str(tasks / "preference.jsonl"), "--max-len", "160",
            "--batch-size", "4", "--train.steps", "6", "--train.optim.lr", "1e-3", "--train.run-dir", str(run_dir),
            "--train.eval-every", "0", "--train.save-every", "3", *QUIET, *extra]


def test_training_from_an_existing_adapter_takes_the_adapted_model_as_reference(model_dir, tasks, tmp_path):
    adapted = load_model(model_dir)
    apply_lora(adapted, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # an adapter that changes the model: a trained one
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(adapted, tmp_path / "adapter", base_model_path=str(model_dir))
    assert cli.main(dpo_args(model_dir, tasks, tmp_path / "run", "--adapter", str(tmp_path / "adapter"),
                             "--train.steps", "1")) == 0
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / dpo.REFERENCE_FILE)
    cfg = parse_args_or_raise(dpo.DPOConfig, ["--max-len", "160", "--batch-size", "4"])
    samples = dpo.read_samples([str(tasks / "preference.jsonl")], cfg, Tokenizer.from_dir(model_dir), "data")
    pad_id = Tokenizer.from_dir(model_dir).pad_id
    with_adapter = load_adapter(load_model(model_dir), tmp_path / "adapter")
    expected = dpo.reference_logps(with_adapter, samples, cfg, pad_id, torch.device("cpu"))
    bare = dpo.reference_logps(load_model(model_dir), samples, cfg, pad_id, torch.device("cpu"))
    torch.testing.assert_close(saved["ref_chosen_logps"], expected["ref_chosen_logps"], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(saved["ref_chosen_logps"], bare["ref_chosen_logps"], atol=1e-2)
    # and the run trained that adapter: its checkpoint is the adapter, changed
    trained = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert trained["r"] == 4


@pytest.mark.parametrize("extra", [[], ["--method", "lora", "--lora.r", "4"], ["--loss-type", "kto"]])
def test_a_resumed_run_reproduces_the_uninterrupted_one(model_dir, tasks, tmp_path, extra):
    if extra[-1:] == ["kto"]:  # unpaired data: each pair's completions, one desirable and one not
        rows = [json.loads(line) for line in (tasks / "preference.jsonl").read_text().splitlines()]
        with open(tmp_path / "kto.jsonl", "w") as f:
            for row in rows:
                for side, label in (("chosen", True), ("rejected", False)):
                    f.write(json.dumps({"prompt": row["prompt"], "completion": row[side], "label": label}) + "\n")
        extra = [*extra, "--data", str(tmp_path / "kto.jsonl")]
    assert cli.main(dpo_args(model_dir, tasks, tmp_path / "full", *extra)) == 0
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    # a run that stopped after step 3: its checkpoint and the reference its start computed
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-000003", tmp_path / "cut" / "checkpoint-000003")
    shutil.copy(tmp_path / "full" / dpo.REFERENCE_FILE, tmp_path / "cut" / dpo.REFERENCE_FILE)
    assert cli.main(dpo_args(model_dir, tasks, tmp_path / "cut", *extra, "--resume", "auto")) == 0
    resumed = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed if r["step"] > 3] == [r["loss"] for r in full if r["step"] > 3]
    assert full[0]["loss"] == pytest.approx(0.5 if "kto" in extra else math.log(2), abs=1e-6)  # policy = reference


def test_bad_loss_types_are_named(model_dir, tasks, tmp_path, capsys):
    assert cli.main(dpo_args(model_dir, tasks, tmp_path, "--loss-type", "sigmoid", "kto")) == 1
    assert "loss_type: kto trains on unpaired data" in capsys.readouterr().err
    assert cli.main(dpo_args(model_dir, tasks, tmp_path, "--loss-type", "dpo")) == 1
    assert "loss_type: dpo is not one of sigmoid" in capsys.readouterr().err


def test_two_processes_train_as_one_with_the_same_global_batch(model_dir, tasks, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    single = dpo_args(model_dir, tasks, tmp_path / "one", "--train.save-every", "0")
    assert cli.main(single) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    two = dpo_args(model_dir, tasks, tmp_path / "two", "--train.save-every", "0", "--batch-size", "2")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "lmforge.cli", *two], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    torch.testing.assert_close(losses("two"), losses("one"), rtol=1e-4, atol=1e-5)  # rounding, grown by 6 steps
    assert len(losses("one")) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_equal_full_logits_in_value_and_gradient(dtype):
    model = tiny_model(seed=1, tie_word_embeddings=False).to(dtype)
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4], labels[2, :] = -100, -100  # a prompt not scored; a row with nothing scored
    sums, counts, _ = sequence_logps(model, ids, labels, chunk_size=5)  # 27 positions: 6 chunks
    (sums * torch.tensor([1.0, -2.0, 3.0])).sum().backward()  # a different upstream gradient per row
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logps = model(ids).logits.float().log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])
    full = logps.squeeze(-1).masked_fill(labels[:, 1:] == -100, 0.0).sum(-1)
    (full * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sums, full, **tol)
    assert counts.tolist() == [5.0, 8.0, 0.0] and sums[2].item() == 0.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name].float(), p.grad.float(), **tol, msg=name)
