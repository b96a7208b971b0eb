"""Training on small corpora and to a time budget: keep the best step by validation loss (final = it, for full
and LoRA runs, resumed exactly), a wall-clock budget with the schedule fitted to it (a fake clock), the warning
when a run repeats its data, and progress as plain lines when standard error is not a terminal."""

from __future__ import annotations

import io
import json
import re
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import RandomBatches, tiny_model

import lmforge.train.trainer as trainer_module
from lmforge.settings import OptionError, parse_args_or_raise
from lmforge.tokenizer import Tokenizer
from lmforge.train import pretrain, sft
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.schedule import lr_at
from lmforge.train.stage import TrainingSet, repeat_warning
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]


def config(run_dir, **kw) -> TrainConfig:
    kw = {"optim": OptimConfig(lr=3e-3, warmup_steps=2), "save_every": 0, "progress": False, **kw}
    return TrainConfig(run_dir=str(run_dir), device="cpu", **kw)


class Interrupt(Exception):
    pass


# -- keep the best step ------------------------------------------------------------------------------------

SCRIPTED = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.8}  # validation loss by step: the best is step 4


def scripted_val(trainer_steps: list[Trainer]):
    """val_fn with the validation loss of SCRIPTED at the trainer's step (a real model that overfits on cue)."""
    return lambda model: {"val_loss": SCRIPTED[trainer_steps[0].step]}


def keep_best_trainer(run_dir, crash_in_step: int | None = None, **kw) -> Trainer:
    holder: list[Trainer] = []

    def loss(model, batch):
        if crash_in_step is not None and holder[0].step + 1 == crash_in_step:
            raise Interrupt
        return causal_lm_loss(model, batch)

    trainer = Trainer(config(run_dir, steps=8, eval_every=2, keep_best=True, **kw), tiny_model(), loss,
                      RandomBatches(4), val_fn=scripted_val(holder))
    holder.append(trainer)
    return trainer


def test_keep_best_makes_final_the_best_step(tmp_path, capsys):
    result = keep_best_trainer(tmp_path, save_every=2, keep_last=10).fit()
    assert result.model_dir == tmp_path / "best-000004" and (tmp_path / "final").resolve() == result.model_dir
    assert result.final_step == 4 and result.val_loss == 2.0 and result.last_val["val_loss"] == 2.8
    # the best directory holds step 4's weights (checkpoint-000004's), without training state
    best, checkpoint = load_file(result.model_dir / "model.safetensors"), \
        load_file(tmp_path / "checkpoint-000004" / "model.safetensors")
    assert best.keys() == checkpoint.keys() and all(torch.equal(best[k], checkpoint[k]) for k in best)
    assert not (result.model_dir / "trainer_state.json").exists()
    assert json.loads((tmp_path / "final.json").read_text()) == {
        "model": "best-000004", "step": 4, "last_step": 8, "val_loss": 2.0, "last_val_loss": 2.8}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["best_step"]) for r in rows if "val_loss" in r] == [(2, 2), (4, 4), (6, 4), (8, 4)]
    assert "final = step 4 (best val loss 2.0000); last step 8 had 2.8000" in capsys.readouterr().out
    # every checkpoint (all kept here) names its best: steps 2 and 4 are kept, no other was ever written
    assert sorted(p.name for p in tmp_path.glob("best-*")) == ["best-000002", "best-000004"]


def test_keep_best_resumes_exactly_also_after_a_best_written_past_the_checkpoint(tmp_path):
    """Killed in step 5: checkpoint-000003 names best step 2, and best-000004 was written after it. The resumed
    run drops that directory, writes step 4's again, and ends as the uninterrupted run: final = step 4, same
    weights."""
    full = keep_best_trainer(tmp_path / "full", save_every=3).fit()
    with pytest.raises(Interrupt):
        keep_best_trainer(tmp_path / "cut", save_every=3, crash_in_step=5).fit()
    assert (tmp_path / "cut" / "best-000004").is_dir()
    state = json.loads((tmp_path / "cut" / "checkpoint-000003" / "trainer_state.json").read_text())
    assert state["best"] == {"step": 2, "val_loss": 3.0}
    resumed = keep_best_trainer(tmp_path / "cut", save_every=3, resume="auto").fit()
    assert resumed.final_step == full.final_step == 4 and resumed.val == full.val
    a, b = load_file(full.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[3:]]


def test_keep_best_with_lora_adapters(tmp_path, base_model, chats):
    """An adapter run: the best step's adapter directory is final, and --merge merges it."""
    from test_train_stages import sft_config

    result = sft.run(sft_config(tmp_path, base_model, chats, "--method", "lora", "--lora.r", "4", "--merge",
                                "--train.keep-best", "--train.eval-every", "2", "--train.optim.lr", "3e-2"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    best_step = min(val, key=val.get)
    assert result.final_step == best_step and result.model_dir == tmp_path / f"best-{best_step:06d}"
    assert (result.model_dir / "adapter_config.json").is_file()
    assert not (result.model_dir / "model.safetensors").exists()
    assert json.loads((tmp_path / "final.json").read_text())["val_loss"] == val[best_step]
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_keep_best_needs_a_validation_loss(tmp_path):
    with pytest.raises(OptionError, match="train.keep_best: this run has no validation"):
        Trainer(config(tmp_path, keep_best=True), tiny_model(), causal_lm_loss, RandomBatches(4))
    trainer = Trainer(config(tmp_path, steps=2, keep_best=True), tiny_model(), causal_lm_loss, RandomBatches(4),
                      val_fn=lambda model: {"val_accuracy": 0.5})
    with pytest.raises(OptionError, match="keep_best: .* no val_loss .*val_accuracy"):
        trainer.fit()


# -- a wall-clock budget -----------------------------------------------------------------------------------

class FakeClock:
    """time.perf_counter for the trainer module: it moves only when a training step (`step_seconds`) or a
    validation batch (`val_seconds`) runs, so a budget run is the same on any machine."""

    def __init__(self, step_seconds: float = 1.0, val_seconds: float = 0.0):
        self.now, self.step_seconds, self.val_seconds = 1000.0, step_seconds, val_seconds

    def perf_counter(self) -> float:
        return self.now

    def loss(self, model, batch):
        self.now += self.step_seconds if model.training else self.val_seconds
        return causal_lm_loss(model, batch)


def budget_trainer(run_dir, clock: FakeClock, **kw) -> Trainer:
    data = RandomBatches(4)
    kw = {"steps": 1000, "max_minutes": 0.5, **kw}
    return Trainer(config(run_dir, optim=OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1), eval_every=0, **kw),
                   tiny_model(), clock.loss, data, val_data=data.validation(1))


def test_a_time_budget_fits_the_schedule_and_stops_in_time(tmp_path, monkeypatch):
    """30 s at 1 s a step: the schedule, fitted after 1 + 5 steps, has 30 steps; the learning rate is at its
    floor at the last one; the final validation (2 s) and checkpoint follow."""
    clock = FakeClock(val_seconds=2.0)
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    result = budget_trainer(tmp_path, clock).fit()
    assert result.steps == 30 and result.val_loss is not None and result.model_dir.name == "checkpoint-000030"
    lrs = [h["lr"] for h in result.history]
    assert lrs[:6] == pytest.approx([lr_at(s, 1000, 1e-2, 1e-3, 2) for s in range(6)])  # before the fit: steps
    assert lrs[6:] == pytest.approx([lr_at(s, 30, 1e-2, 1e-3, 2) for s in range(6, 30)])
    assert lrs[-1] == pytest.approx(1e-3)
    state = json.loads((tmp_path / "checkpoint-000030" / "trainer_state.json").read_text())
    assert state["train_seconds"] == 32.0  # 30 steps + the final validation


def test_a_resumed_budget_run_gets_what_is_left(tmp_path, monkeypatch):
    """Killed after 12 s with a checkpoint at step 10 (10 s spent): the resumed run trains until the 30 s are
    spent, steps 11 to 30, and its schedule ends with the budget as the uninterrupted run's."""
    clock = FakeClock()
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    loss = clock.loss

    def crashing(model, batch):
        if clock.now >= 1012.0:
            raise Interrupt
        return loss(model, batch)

    clock.loss = crashing
    with pytest.raises(Interrupt):
        budget_trainer(tmp_path, clock, save_every=10).fit()
    state = json.loads((tmp_path / "checkpoint-000010" / "trainer_state.json").read_text())
    assert state["train_seconds"] == 10.0
    clock.loss = loss
    resumed = budget_trainer(tmp_path, clock, save_every=10, resume="auto").fit()
    assert resumed.steps == 30 and resumed.history[0]["step"] == 11
    assert resumed.history[-1]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("minutes, match", [(-1.0, "max_minutes: -1.0 is out of range"),
                                            (0.0, "train.max_minutes: 0.0 is not a positive"),
                                            (float("nan"), "train.max_minutes: nan is not a positive")])
def test_bad_budgets_are_named(tmp_path, minutes, match):
    with pytest.raises(OptionError, match=match):
        Trainer(config(tmp_path, max_minutes=minutes), tiny_model(), causal_lm_loss, RandomBatches(4))
    with pytest.raises(OptionError, match="train.max_minutes: -2.0 is out of range"):
        parse_args_or_raise(pretrain.PretrainConfig, ["--train.max-minutes", "-2"])


# -- data repeated -----------------------------------------------------------------------------------------

def test_repeat_warning_counts_epochs():
    data = TrainingSet("runs/data", 250_000, 2048)
    assert repeat_warning(100, data, keep_best=False) is None  # 0.8 epochs
    assert repeat_warning(1000, data, keep_best=False) == (
        "1000 steps x 2,048 tokens = 8.2 epochs of runs/data's 250k training tokens; "
        "expect overfitting: see --train.keep-best")
    assert repeat_warning(1000, data, keep_best=True, minutes=10).startswith("1000 steps (fitted to 10 minutes) x")
    assert "final is the step with the best validation loss" in repeat_warning(1000, data, keep_best=True)


def test_pretrain_warns_once_with_the_epoch_count(tmp_path, corpus, base_model, capsys):
    _, data = corpus
    windows = pretrain.PretrainLoader(data, "train", 16, 64).windows  # 64-token windows of the training split
    steps = windows // 16 + 3  # a few steps into the second epoch
    cfg = parse_args_or_raise(pretrain.PretrainConfig, [
        "--model", str(base_model), "--data", str(data), "--seq-len", "64", "--batch-size", "16",
        "--eval-batches", "1", "--train.steps", str(steps), "--train.eval-every", "0", "--train.save-every", "0",
        "--train.run-dir", str(tmp_path), *QUIET])
    pretrain.run(cfg)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "epochs of" in line]
    assert len(warnings) == 1
    match = re.fullmatch(r"warning: (\d+) steps x 1,024 tokens = (\d+\.\d) epochs of (.+)'s ([\d.]+k) training "
                         r"tokens; final is the step with the best validation loss \(train.keep_best\)", warnings[0])
    assert match and int(match[1]) == steps and match[3] == str(data)
    assert float(match[2]) == pytest.approx(steps * 1024 / (windows * 64), abs=0.06)


def test_sft_training_set_counts_rows_and_tokens(corpus, chats):
    tokenizer = Tokenizer.from_dir(corpus[0])
    for packed in (False, True):
        cfg = parse_args_or_raise(sft.SFTConfig, ["--data", str(chats), "--max-len", "64", "--batch-size", "4",
                                                  "--train.grad-accum", "2", *(["--packed"] if packed else [])])
        samples = sft.read_samples(cfg.data, cfg, tokenizer, "data")
        data = sft.training_set(samples, cfg, world_size=1)
        batches = sum(1 for _ in sft.epoch_batches(samples, cfg, tokenizer.pad_id, 0, 1, shuffle=False)(0))
        assert data.tokens == sum(len(s.input_ids) for s in samples)
        assert data.tokens_per_step == pytest.approx(data.tokens / (batches / 2))  # 2 micro-batches a step


# -- progress ----------------------------------------------------------------------------------------------

def progress_run(tmp_path, monkeypatch, stderr) -> str:
    """20 steps of 3 fake seconds each, with progress, writing to `stderr`."""
    clock = FakeClock(step_seconds=3.0)
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(sys, "stderr", stderr)
    Trainer(config(tmp_path, steps=20, progress=True), tiny_model(), clock.loss, RandomBatches(4)).fit()
    return stderr.getvalue()


def test_progress_off_a_terminal_is_a_plain_line_every_ten_seconds(tmp_path, monkeypatch):
    out = progress_run(tmp_path, monkeypatch, io.StringIO())
    assert "\r" not in out
    lines = out.splitlines()
    # at the first step, then once 10 s have passed since the last line (steps 5, 9, 13, 17), and the last
    assert [int(re.match(r"step (\d+)/20  loss \d+\.\d{4}  lr \S+  \d+ tok/s  ", line)[1]) for line in lines] == \
        [1, 5, 9, 13, 17, 20]
    assert lines[1].endswith("0:15 elapsed, 0:45 left")  # 15 s for 5 steps, 15 steps to go


def test_progress_on_a_terminal_is_a_bar(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = progress_run(tmp_path, monkeypatch, Terminal())
    assert "\r" in out and "training: 100%" in out and not re.search(r"^step \d+/", out, re.M)

