"""`lmforge reward` against TRL itself (one RewardTrainer step on the same tiny model and batch gives the same
loss and the same updated weights, also with reward centering and margins), its directories against
transformers (AutoModelForSequenceClassification gives the scorer's scores, however the batch is padded) and
PEFT (a LoRA run's adapter carries the trained score head), held-out accuracy, exact resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_model

from lmforge import cli
from lmforge.checkpoint import CheckpointError, load_model, load_reward_model, model_from, save_model
from lmforge.config import ModelConfigError
from lmforge.model.lora import LoraConfig, apply_lora
from lmforge.settings import parse_args_or_raise
from lmforge.tokenizer import Tokenizer
from lmforge.train import reward
from lmforge.train.checkpointing import load_state
from lmforge.train.stage import EpochBatches
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).parents[1]
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]
# Adam's first step moves a weight by lr * g / (|g| + eps): at |g| << eps, by lr / eps per unit of gradient. An
# embedding row sums the gradients of each of its token's positions, and where they cancel (a row of 16
# positions summing to 4e-5 here) both trainers land about 4e-6 from a float64 reference, 4e-7 apart in one
# element: eps 1e-3 keeps that below 1e-6 (test_dpo.py's 1e-4 would make it 4e-6, 0.4% of lr).
ADAM_EPS = 1e-3
PAIRS = [{"prompt": [{"role": "user", "content": "What is 2+2?"}],
          "chosen": [{"role": "assistant", "content": "It is 4."}],
          "rejected": [{"role": "assistant", "content": "It is 5, I think."}]},
         {"prompt": [{"role": "user", "content": "Name a play:"}],
          "chosen": [{"role": "assistant", "content": "Hamlet"}],
          "rejected": [{"role": "assistant", "content": "Cats and dogs"}]}]


@pytest.fixture(scope="module")
def model_dir(corpus, tmp_path_factory):
    """A causal LM with an output layer of its own (untied), which a reward model must leave out."""
    path = tmp_path_factory.mktemp("reward") / "model"
    save_model(tiny_model(seed=5, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False), path,
               tokenizer_dir=corpus[0])
    return path


def reward_args(model_dir, tasks, run_dir, *extra):
    return ["reward", "--model", str(model_dir), "--data", str(tasks / "preference.jsonl"), "--max-len", "160",
            "--batch-size", "4", "--train.steps", "6", "--train.optim.lr", "1e-3", "--train.run-dir", str(run_dir),
            "--train.eval-every", "0", "--train.save-every", "3", *QUIET, *extra]


# -- one step against TRL ------------------------------------------------------------------------------------

def trl_step(model_dir, score_weight, tmp_path, center: float | None, margins: list[float] | None):
    """One RewardTrainer step (fp32, AdamW, lr 1e-3) from model_dir's body and `score_weight`: its batch, loss
    and updated weights."""
    import datasets
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(score_weight)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, learning_rate=1e-3,
                            max_steps=1, bf16=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                            seed=0, gradient_checkpointing=False, adam_epsilon=ADAM_EPS,
                            center_rewards_coefficient=center)
    rows = [dict(pair, margin=m) for pair, m in zip(PAIRS, margins)] if margins else PAIRS
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=AutoTokenizer.from_pretrained(model_dir))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    loss = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
    return batch, loss, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("center, margins", [(None, None), (0.1, None), (None, [1.0, -0.5])],
                         ids=["plain", "centered", "margins"])
def test_one_step_equals_trls_reward_trainer(model_dir, tmp_path, center, margins):
    # rewards of a few units, so that the centering term and the margins weigh in the loss
    score_weight = 0.3 * torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    batch, trl_loss, trl_weights = trl_step(model_dir, score_weight, tmp_path, center, margins)
    half = batch["input_ids"].shape[0] // 2
    ours = {"chosen_input_ids": batch["input_ids"][:half], "rejected_input_ids": batch["input_ids"][half:],
            "margin": batch.get("margin", torch.zeros(half))}
    model = load_reward_model(model_dir)
    model.config.pad_token_id = Tokenizer.from_dir(model_dir).pad_id  # as the stage and TRL set it
    with torch.no_grad():
        model.score.weight.copy_(score_weight)
        plain, _ = reward.reward_loss(model, {**ours, "margin": torch.zeros(half)})  # neither option
    train = TrainConfig(run_dir=str(tmp_path / "ours"), steps=1, save_every=0, eval_every=0, progress=False,
                        device="cpu", optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, beta2=0.999,
                                                        eps=ADAM_EPS, min_lr_ratio=1.0, grad_clip=1.0))
    trainer = Trainer(train, model, lambda m, b: reward.reward_loss(m, b, center), EpochBatches(lambda _: iter([ours])))
    row = trainer.train_step()
    assert row["loss"] == pytest.approx(trl_loss, rel=1e-5)
    if center or margins:  # the option is in the loss, not lost on the way
        assert abs(row["loss"] - plain.item()) > 0.05
    assert set(trl_weights) == {n for n, _ in model.named_parameters()}  # the same parameters, none extra
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), trl_weights[name], rtol=1e-5, atol=1e-6, msg=name)


# -- the directory in transformers, the scorer, held-out accuracy ---------------------------------------------

def test_trained_model_scores_alike_in_transformers_however_padded(model_dir, tasks, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    # Five held-out pairs, in batches of 4 and 1, that this run ranks right, wrong, wrong, wrong | right: 2/5 right,
    # where a mean of the batches' accuracies would say 0.625.
    held_out = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a + b}", "rejected": rejected}
                for a, b, rejected in ((1, 1, "It is 3"), (1, 3, "5."), (2, 2, "5."), (4, 4, "9."), (6, 1, "It is 8"))]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in held_out))
    assert cli.main(reward_args(model_dir, tasks, tmp_path / "run", "--val-data", str(tmp_path / "held_out.jsonl"),
                                "--train.steps", "3", "--train.save-every", "0")) == 0
    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "LABEL_0"}
    assert "lm_head.weight" not in load_file(final / "model.safetensors")

    # held-out accuracy: printed, logged, and the fraction of held-out pairs the final model ranks right
    assert "held-out pair accuracy" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    scorer = reward.RewardScorer.load(final, batch_size=3)
    chosen = scorer.score([[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]
                           for p in held_out])
    rejected = scorer.score([[{"role": "user", "content": p["prompt"]},
                              {"role": "assistant", "content": p["rejected"]}] for p in held_out])
    assert [c > r for c, r in zip(chosen, rejected)] == [True, False, False, False, True]
    assert logged["val_accuracy"] == pytest.approx(2 / 5)

    items = [PAIRS[0]["prompt"] + PAIRS[0]["chosen"], "a plain text, scored as its tokens",
             PAIRS[1]["prompt"] + PAIRS[1]["rejected"], [{"role": "user", "content": "Hi"}]]
    ours = torch.tensor(scorer.score(items))
    alone = torch.tensor([scorer.score([item])[0] for item in items])
    torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-6)
    hf = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    rows = [scorer.encode(item) for item in items]
    width, pad_id = max(map(len, rows)), scorer.tokenizer.pad_id
    for side in ("right", "left"):
        padding = [[pad_id] * (width - len(row)) for row in rows]
        ids = torch.tensor([row + fill if side == "right" else fill + row for row, fill in zip(rows, padding)])
        with torch.no_grad():
            theirs = hf(ids, attention_mask=(ids != pad_id).long()).logits.squeeze(-1)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5, msg=side)


def test_scorer_is_a_reward_function_for_rejection_sampling(model_dir, tmp_path, monkeypatch):
    from lmforge.train.rewards import load_reward_function, score

    model = model_from(model_dir, reward=True)
    model.config.pad_token_id = Tokenizer.from_dir(model_dir).pad_id
    save_model(model, tmp_path / "rm", tokenizer_dir=model_dir)
    (tmp_path / "my_rm.py").write_text("from lmforge.train.reward import RewardScorer\n"
                                       f"rm = RewardScorer.load({str(tmp_path / 'rm')!r})\n")
    monkeypatch.chdir(tmp_path)  # where `lmforge rejection --reward my_rm:rm` finds the module
    prompts, completions = [p["prompt"] for p in PAIRS], [p["chosen"] for p in PAIRS]
    values = score(load_reward_function("my_rm:rm"), prompts, completions, {"answer": ["4", "Hamlet"]})
    assert values == reward.RewardScorer.load(tmp_path / "rm").score([p + c for p, c in zip(prompts, completions)])
    assert score(load_reward_function(str(tmp_path / "rm")), prompts, completions, {}) == values  # by directory
    with pytest.raises(CheckpointError, match="a language model, not a reward model"):
        reward.RewardScorer.load(model_dir)


# -- LoRA, resume ----------------------------------------------------------------------------------------------

def test_lora_adapter_holds_the_trained_head_and_loads_in_peft(model_dir, tasks, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    lora = ["--method", "lora", "--lora.r", "4", "--lora.target-modules", "q_proj", "v_proj"]
    assert cli.main(reward_args(model_dir, tasks, tmp_path, *lora, "--train.steps", "2")) == 0
    final = tmp_path / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    # lmforge's trained model: the base, the run's adapters, its trained weights (the head among them)
    ours = load_reward_model(model_dir)
    initial_head = ours.score.weight.detach().clone()
    apply_lora(ours, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trained = load_state(final, "training_state")["model"]
    assert "score.weight" in trained and not torch.allclose(trained["score.weight"], initial_head)
    ours.load_state_dict(trained, strict=False)
    ours.config.pad_token_id = pad_id = Tokenizer.from_dir(model_dir).pad_id

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = pad_id
    peft_model = PeftModel.from_pretrained(base, final).eval()
    ids = torch.tensor([[5, 9, 40, 41, 42, 7], [5, 9, 12, 13, pad_id, pad_id]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits.squeeze(-1), ours(ids).rewards, rtol=1e-5, atol=1e-6)
    # and lmforge loads the adapter back, head included, as the scorer does; merged, it is a reward model
    scorer = reward.RewardScorer.load(final)
    assert cli.main(["merge", "--model", str(model_dir), "--adapter", str(final), "--out", str(tmp_path / "m")]) == 0
    merged = load_reward_model(tmp_path / "m")
    merged.config.pad_token_id = pad_id
    with torch.no_grad():
        torch.testing.assert_close(scorer.model(ids).rewards, ours(ids).rewards, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged(ids).rewards, ours(ids).rewards, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["--method", "lora", "--lora.r", "4", "--center-rewards-coefficient", "0.01"]])
def test_a_resumed_run_reproduces_the_uninterrupted_one(model_dir, tasks, tmp_path, extra):
    assert cli.main(reward_args(model_dir, tasks, tmp_path / "full", *extra)) == 0
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "cut").mkdir()  # a run that stopped after step 3
    shutil.copytree(tmp_path / "full" / "checkpoint-000003", tmp_path / "cut" / "checkpoint-000003")
    assert cli.main(reward_args(model_dir, tasks, tmp_path / "cut", *extra, "--resume", "auto")) == 0
    resumed = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed if r["step"] > 3] == [r["loss"] for r in full if r["step"] > 3]
    assert len({r["loss"] for r in full}) == 6  # it trains


# -- input and directories that are wrong ----------------------------------------------------------------------

def test_bad_pairs_are_named_or_skipped(model_dir, tmp_path, capsys):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "3+3?", "chosen": "6"},
            {"prompt": "1+1?", "chosen": "2", "rejected": "3", "margin": "big"},
            {"prompt": "1+2?", "chosen": "3", "rejected": "4", "margin": 0.5}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["reward", "--model", str(model_dir), "--data", str(data), "--train.steps", "1",
            "--train.run-dir", str(tmp_path / "run"), *QUIET]
    assert cli.main(args) == 1
    assert f"{data}, line 2: missing field 'rejected'" in capsys.readouterr().err
    assert cli.main([*args, "--skip-bad"]) == 0
    assert "2 skipped" in capsys.readouterr().out
    cfg = parse_args_or_raise(reward.RewardConfig, ["--skip-bad"])
    samples = reward.read_samples([str(data)], cfg, Tokenizer.from_dir(model_dir), "data")
    assert [s["margin"] for s in samples] == [0.0, 0.5]


def test_reward_directories_are_told_apart_and_checked(model_dir, tmp_path):
    model = model_from("tiny", reward=True, vocab_size=300, pad_token_id=0)
    assert "lm_head.weight" not in model.state_dict() and model.score.weight.shape == (1, 192)
    save_model(model, tmp_path / "rm")
    assert not (tmp_path / "rm" / "generation_config.json").exists()  # transformers writes none for a classifier
    with pytest.raises(CheckpointError, match="a reward model .LlamaForSequenceClassification.*load_reward_model"):
        load_model(tmp_path / "rm")
    torch.testing.assert_close(load_reward_model(tmp_path / "rm").score.weight, model.score.weight)
    tensors = load_file(tmp_path / "rm" / "model.safetensors")
    del tensors["score.weight"]
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "rm" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: score.weight"):
        load_reward_model(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match="num_labels: 2"):
        load_reward_model(tmp_path / "rm")


def test_recipe_and_help(capsys):
    recipe = parse_args_or_raise(reward.RewardConfig, ["--config", str(ROOT / "configs" / "reward_tiny.yaml")])
    assert recipe.data == ["runs/tasks/preference.jsonl"] and recipe.val_fraction == 0.1
    assert reward.split_off(list(range(8)), 0.25) == ([0, 1, 2, 4, 5, 6], [3, 7])  # every 4th held out
    with pytest.raises(SystemExit):
        cli.main(["reward", "--help"])
    out = capsys.readouterr().out
    for option in ("--center-rewards-coefficient", "--val-fraction", "--method", "--train.optim.lr FLOAT  "
                   "(default: 0.0001"):
        assert option in out
