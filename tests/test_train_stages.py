"""The stages over the Trainer: `lmforge pretrain` (preset or HF dir, on prepared shards; SIGKILL and
resume; config errors) and `lmforge sft` (full, freeze, LoRA, DoRA; loss on replies only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.checkpoint import load_model
from lmforge.cli import main as cli
from lmforge.model.lora import load_adapter
from lmforge.settings import OptionError, parse_args_or_raise
from lmforge.tokenizer import Tokenizer
from lmforge.train import pretrain, sft
from lmforge.train.checkpointing import complete_checkpoints
from lmforge.train.metrics import read_metrics

ROOT = Path(__file__).parents[1]
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(run_dir) -> list[dict]:
    return read_metrics(Path(run_dir) / "metrics.jsonl")


# -- pretrain -------------------------------------------------------------------------------------------

def test_pretrain_from_hf_dir_learns_and_writes_loadable_checkpoints(tmp_path, corpus, base_model):
    _, data = corpus
    cfg = parse_args_or_raise(pretrain.PretrainConfig, [
        "--model", str(base_model), "--data", str(data), "--seq-len", "32", "--batch-size", "4",
        "--train.steps", "30", "--train.eval-every", "15", "--train.save-every", "15",
        "--train.run-dir", str(tmp_path), "--train.optim.lr", "3e-3", "--train.optim.warmup-steps", "3", *QUIET])
    result = pretrain.run(cfg)
    val = [r["val_loss"] for r in metrics(tmp_path) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] < 5.7  # ln(300) = 5.7 at random init
    # bits per byte: the loss in bits over the bytes per token of the validation text (byte-level BPE
    # with 300 tokens: between 1 and 3 bytes per token)
    assert 1.0 < result.val_loss / 0.6931 / result.val_bpb < 3.0
    # keep_best, pretraining's default: final is the best step's model, here the last one
    assert result.loss_curve.is_file() and result.model_dir == tmp_path / "best-000030" and result.final_step == 30
    assert json.loads((tmp_path / "final.json").read_text())["step"] == 30
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-000015", "checkpoint-000030"]
    # checkpoint-000015's best is best-000015 (resuming from it needs it); RUN_DIR/best is the newest
    assert sorted(p.name for p in tmp_path.glob("best-*")) == ["best-000015", "best-000030"]
    assert (tmp_path / "best").resolve() == result.model_dir
    # The checkpoint is an HF dir with the tokenizer; training state sits beside the weights.
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir)
    ours = load_model(result.model_dir)
    ids = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    assert Tokenizer.from_dir(result.model_dir).vocab_size == 300
    assert {"training_state.safetensors", "training_state.json", "rank0.safetensors", "rank0.json"} <= {
        p.name for p in (tmp_path / "checkpoint-000030").iterdir()}


def test_pretrain_cli_from_preset_with_yaml(tmp_path, corpus):
    _, data = corpus
    recipe = yaml.safe_load((ROOT / "configs" / "pretrain_tiny.yaml").read_text())
    recipe.update(data=str(data), seq_len=32, batch_size=2, eval_batches=2)
    recipe["train"].update(run_dir=str(tmp_path / "run"), steps=2, eval_every=0, save_every=0)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli(["pretrain", "--config", str(tmp_path / "recipe.yaml"), "--train.optim.lr", "1e-3", *QUIET]) == 0
    model = load_model(tmp_path / "run" / "final")
    assert model.config.hidden_size == 192 and model.config.vocab_size == 300  # the tiny preset, data's vocab
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["optim"]["lr"] == 1e-3


def test_every_recipe_parses():
    """Every configs/<command>_*.yaml parses as that command's options (so a recipe of a new command must
    be added to this table, and a renamed option breaks the test, not a user's run)."""
    import importlib

    from lmforge.cli import COMMANDS

    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        command = path.stem.split("_")[0]
        module = importlib.import_module(COMMANDS[command][0])
        (cls,) = [v for k, v in vars(module).items() if k.endswith("Config") and getattr(v, "__module__", "") ==
                  module.__name__ and k not in ("FreezeConfig", "RLConfig")]
        argv = ["--config", str(path)]
        parse_args_or_raise(cls, argv)
        assert argv == ["--config", str(path)]  # the caller's list is not consumed (a script parses it twice)


def test_config_errors_name_the_bad_key(tmp_path, capsys):
    with pytest.raises(OptionError, match="train.optim.lrr"):
        parse_args_or_raise(pretrain.PretrainConfig, ["--train.optim.lrr", "1e-3"])
    with pytest.raises(OptionError, match="train.precision"):
        parse_args_or_raise(pretrain.PretrainConfig, ["--train.precision", "fp8"])
    (tmp_path / "bad.yaml").write_text("train:\n  stpes: 10\n")
    with pytest.raises(OptionError, match=r"train\.stpes.*bad\.yaml"):
        parse_args_or_raise(sft.SFTConfig, ["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit):
        cli(["sft", "--lora.rank", "8"])
    assert "lora.rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["sft", "--help"])
    out = capsys.readouterr().out
    for option in ("--method", "--lora.r", "--lora.target-modules", "--freeze.layers", "--train.optim.schedule",
                   "--train.grad-accum", "--train.resume", "--train.distributed", "--train.precision"):
        assert option in out
    assert "--train.run-dir STR  (default: runs/sft)" in out  # the stage's own defaults for its Trainer


KILL_ARGS = ["--train.steps", "24", "--train.save-every", "3", "--train.keep-last", "2", "--train.eval-every", "0",
             "--seq-len", "32", "--batch-size", "4", *QUIET]


def test_sigkill_at_any_moment_resumes_from_last_complete_checkpoint(tmp_path, corpus, base_model):
    _, data = corpus
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

    def launch(run_dir, *extra):
        return subprocess.Popen([sys.executable, "-m", "lmforge.cli", "pretrain", "--model", str(base_model),
                                 "--data", str(data), "--train.run-dir", str(run_dir), *KILL_ARGS, *extra],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = launch(tmp_path / "reference")
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    # Kill three times, each a little later after a new checkpoint appeared: in a step, or in a save.
    for delay in (0.0, 0.1, 0.25):
        newest = ([p.name for p in complete_checkpoints(tmp_path / "killed")] or [""])[-1]
        victim = launch(tmp_path / "killed", "--train.resume", "auto")
        deadline = time.time() + 60
        while ([p.name for p in complete_checkpoints(tmp_path / "killed")] or [""])[-1] == newest \
                and victim.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
        survivors = complete_checkpoints(tmp_path / "killed")
        assert survivors and all(load_model(p) for p in survivors)
    resumed = launch(tmp_path / "killed", "--train.resume", "auto")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    losses = lambda run: [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")
    assert not list((tmp_path / "killed").glob(".*checkpoint-*"))  # no temporary dir left behind


# -- sft ------------------------------------------------------------------------------------------------

def sft_config(tmp_path, base_model, chats, *extra) -> sft.SFTConfig:
    return parse_args_or_raise(sft.SFTConfig, [
        "--model", str(base_model), "--data", str(chats), "--val-data", str(chats), "--max-len", "64",
        "--batch-size", "4", "--train.steps", "6", "--train.eval-every", "0", "--train.save-every", "0",
        "--train.run-dir", str(tmp_path), "--train.optim.lr", "1e-2", "--train.optim.warmup-steps", "1",
        "--chunk-size", "16", *QUIET, *extra])


def test_sft_labels_cover_assistant_replies_only(corpus, chats):
    tokenizer = Tokenizer.from_dir(corpus[0])
    cfg = parse_args_or_raise(sft.SFTConfig, ["--max-len", "64", "--batch-size", "2"])
    samples = sft.read_samples([str(chats)], cfg, tokenizer, "data")
    batch = next(sft.epoch_batches(samples, cfg, tokenizer.pad_id, 0, 1, shuffle=False)(0))
    answers = [json.loads(line)["messages"][-1]["content"] for line in chats.read_text().splitlines()]
    for ids, labels, answer in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), answers):
        # position t is trained to predict token t+1, only on the reply and its end-of-turn token
        assert all(label == ids[t + 1] for t, label in enumerate(labels) if label != -100)
        assert tokenizer.decode([t for t in labels if t != -100]) == answer + "<|im_end|>"


def test_sft_full_learns_on_packed_rows(tmp_path, base_model, chats):
    result = sft.run(sft_config(tmp_path, base_model, chats, "--train.steps", "12", "--packed"))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.5
    assert load_model(result.model_dir).config.vocab_size == 300


def test_sft_freeze_trains_only_chosen_layers(tmp_path, base_model, chats):
    result = sft.run(sft_config(tmp_path, base_model, chats, "--method", "freeze", "--freeze.layers", "-1",
                                "--freeze.modules", "model.norm"))
    before, after = load_model(base_model).state_dict(), load_model(result.model_dir).state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {n for n in before if n.startswith(("model.layers.1.", "model.norm."))}
    assert changed == expected
    with pytest.raises(ValueError, match="freeze.layers"):
        sft.run(sft_config(tmp_path / "bad", base_model, chats, "--method", "freeze", "--freeze.layers", "5"))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_sft_lora_and_dora_end_to_end(tmp_path, base_model, chats, method):
    result = sft.run(sft_config(tmp_path, base_model, chats, "--method", method, "--lora.r", "4",
                                "--lora.target-modules", "all-linear", "--lora.dropout", "0.1", "--merge",
                                "--train.save-every", "3"))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    adapter = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert adapter["use_dora"] == (method == "dora") and len(adapter["target_modules"]) == 14
    assert not (result.model_dir / "model.safetensors").exists()  # a checkpoint is the adapter only
    # The adapter on the base model computes what the merged model computes, and differs from the base.
    ids = torch.randint(0, 300, (1, 10))
    base = load_model(base_model).eval()
    adapted = load_adapter(load_model(base_model), result.model_dir).eval()
    merged = load_model(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-3)
    # Resuming an adapter run from its step-3 checkpoint reproduces steps 4-6 exactly (dropout RNG included).
    resumed = sft.run(sft_config(tmp_path / "again", base_model, chats, "--method", method, "--lora.r", "4",
                                 "--lora.target-modules", "all-linear", "--lora.dropout", "0.1",
                                 "--train.resume", str(tmp_path / "checkpoint-000003")))
    assert [h["loss"] for h in resumed.history] == losses[3:]
    with pytest.raises(ValueError, match="does not fit this model"):  # an adapter run resumed as full training
        sft.run(sft_config(tmp_path / "full", base_model, chats, "--train.resume", str(tmp_path / "checkpoint-000003")))
