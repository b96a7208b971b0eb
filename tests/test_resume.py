"""Resuming reads only safetensors and JSON, so a shared checkpoint cannot run code; a damaged or foreign
checkpoint is an error naming the file, and `resume: auto` falls back past it to the one before."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import RandomBatches, tiny_model

from lmforge.checkpoint import CheckpointError
from lmforge.train.checkpointing import load_state, save_state
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


def train(run_dir, steps=8, resume=None, stop_at=None, model_seed=0):
    """A run of `steps` steps with checkpoints every 2 (the last 3 kept); `stop_at`: raise in that step."""
    cfg = TrainConfig(run_dir=str(run_dir), steps=steps, save_every=2, keep_last=3, eval_every=0, progress=False,
                      device="cpu", resume=resume, optim=OptimConfig(lr=1e-2, warmup_steps=2))
    calls = 0

    def loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == stop_at:
            raise Interrupt
        return causal_lm_loss(model, batch)

    return Trainer(cfg, tiny_model(seed=model_seed), loss, RandomBatches(4)).fit()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return train(tmp_path_factory.mktemp("full") / "run")


@pytest.fixture
def cut(tmp_path):
    """A run killed in step 7: its checkpoints are steps 2, 4 and 6."""
    with pytest.raises(Interrupt):
        train(tmp_path / "cut", stop_at=7)
    return tmp_path / "cut"


def rewrite(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace a file of a checkpoint and record its new size, as if it had been written so."""
    (checkpoint / name).write_bytes(data)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["files"][name] = len(data)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


class Payload:
    """Unpickling this creates the file `marker`: code run by loading a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_never_unpickles(cut, full, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resume called an unpickler")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    resumed = train(cut, resume="auto")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[6:]]


@pytest.mark.parametrize("name", ["training_state.safetensors", "training_state.json", "rank0.safetensors",
                                  "rank0.json", "trainer_state.json"])
def test_a_pickled_payload_in_a_state_file_is_refused_and_never_runs(cut, tmp_path, name):
    marker = tmp_path / "payload-ran"
    checkpoint = cut / "checkpoint-000006"
    payload = pickle.dumps(Payload(marker))
    if name == "trainer_state.json":
        (checkpoint / name).write_bytes(payload)
    else:
        rewrite(checkpoint, name, payload)
    with pytest.raises(CheckpointError, match=rf"checkpoint-000006/{name}: "):
        train(cut, resume=str(checkpoint))
    assert not marker.exists()


def test_an_old_pickled_checkpoint_is_refused_naming_the_file(cut, tmp_path):
    marker = tmp_path / "payload-ran"
    legacy = cut / "checkpoint-000006"
    for file in legacy.iterdir():
        if file.name.startswith(("training_state", "rank0", "trainer_state")):
            file.unlink()
    torch.save({"model": Payload(marker)}, legacy / "training_state.pt")  # how lmforge wrote it before
    (legacy / "trainer_state.json").write_text(json.dumps({"step": 6, "tokens_seen": 0, "skipped": 0,
                                                           "world_size": 1}))
    with pytest.raises(CheckpointError, match=r"checkpoint-000006/training_state\.pt: a pickled training state"):
        train(cut, resume=str(legacy))
    assert not marker.exists()


def drop_key(checkpoint: Path, name: str, *path: str) -> None:
    data = json.loads((checkpoint / name).read_text())
    *parents, leaf = path
    parent = data
    for key in parents:
        parent = parent[key]
    del parent[leaf]
    rewrite(checkpoint, name, json.dumps(data).encode())


def truncate(checkpoint: Path, name: str) -> None:
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda c: truncate(c, "model.safetensors"), r"model\.safetensors: \d+ bytes, but \d+ were written"),
    (lambda c: truncate(c, "training_state.safetensors"), r"training_state\.safetensors: \d+ bytes"),
    (lambda c: (c / "rank0.json").unlink(), r"rank0\.json: missing"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 6,'), r"trainer_state\.json: not valid JSON"),
    (lambda c: drop_key(c, "rank0.json", "rng", "python"), r"rank0\.json: missing 'python'"),
    (lambda c: (c / "trainer_state.json").unlink(), r"checkpoint-000006: no trainer_state\.json"),
])
def test_resume_auto_falls_back_past_a_damaged_checkpoint(cut, full, capsys, damage, named):
    damage(cut / "checkpoint-000006")
    resumed = train(cut, resume="auto")
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]  # from step 4's checkpoint
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[4:]]
    assert len(_warnings(capsys.readouterr().err, named)) == 1


def _warnings(err: str, pattern: str) -> list[str]:
    import re

    return [line for line in err.splitlines() if line.startswith("warning: ") and re.search(pattern, line)]


def test_a_damaged_checkpoint_named_explicitly_is_an_error_and_auto_with_all_damaged_too(cut):
    for step in (2, 4, 6):
        truncate(cut / f"checkpoint-{step:06d}", "rank0.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint-000004/rank0\.safetensors: \d+ bytes"):
        train(cut, resume=str(cut / "checkpoint-000004"))
    with pytest.raises(CheckpointError, match=r"checkpoint-000002/rank0\.safetensors"):
        train(cut, resume="auto")


@pytest.mark.parametrize("part", ["model", "optimizer"])
def test_a_state_tensor_of_another_shape_is_named_not_broadcast(cut, part):
    checkpoint = cut / "checkpoint-000006"
    state = load_state(checkpoint, "training_state")
    if part == "model":  # (1,) would broadcast into (32,) with copy_
        state["model"]["model.norm.weight"] = torch.ones(1)
        match = r"training_state\.json: does not fit this model: 'model\.norm\.weight' has shape \(1,\)"
    else:
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
        match = r"training_state\.json: optimizer state 'exp_avg' of parameter 0 has shape \(3,\)"
    save_state(state, checkpoint, "training_state")
    for name in ("training_state.json", "training_state.safetensors"):
        rewrite(checkpoint, name, (checkpoint / name).read_bytes())
    with pytest.raises(CheckpointError, match=match):
        train(cut, resume=str(checkpoint))


def test_state_files_round_trip_every_kind_of_value(tmp_path):
    state = {"ints": {0: torch.arange(3), 7: (1.5, None, True)}, "nested": [{"__odd": "x"}, [torch.ones(2, 2)]],
             "text": "a", "big": 2**70, "nan": float("inf")}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back.keys() == state.keys() and back["ints"].keys() == {0, 7}  # int keys stay ints (optimizer state)
    assert torch.equal(back["ints"][0], state["ints"][0]) and back["ints"][7] == (1.5, None, True)
    assert back["nested"][0] == {"__odd": "x"} and torch.equal(back["nested"][1][0], torch.ones(2, 2))
    assert back["big"] == 2**70 and back["nan"] == float("inf") and back["text"] == "a"
    with pytest.raises(TypeError, match=r"s\.x: a set cannot be saved"):
        save_state({"x": {1}}, tmp_path, "s")
    for depth in (900, 100_000):  # too deep for the decoder, or for json itself: named, not a RecursionError
        (tmp_path / "s.json").write_text('{"ints": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(CheckpointError, match=r"s\.json: nested too deeply to be read"):
            load_state(tmp_path, "s")


def test_copied_checkpoint_from_another_run_is_refused(cut, tmp_path):
    """A LoRA-shaped or otherwise foreign state: the model lacks its tensors, named with the file."""
    checkpoint = cut / "checkpoint-000006"
    state = load_state(checkpoint, "training_state")
    state["model"]["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(2, 2)
    save_state(state, checkpoint, "training_state")
    for name in ("training_state.json", "training_state.safetensors"):
        rewrite(checkpoint, name, (checkpoint / name).read_bytes())
    shutil.copytree(checkpoint, tmp_path / "copy")
    with pytest.raises(CheckpointError, match=r"copy/training_state\.json: does not fit this model: it has "
                                              r"\['model\.layers\.0\.self_attn\.q_proj\.lora_A'\]"):
        train(cut, resume=str(tmp_path / "copy"))


class Counter:
    """A stage's own state (say, how many rollouts it has made), with a tensor in it too."""

    def __init__(self):
        self.count, self.seen = 0, torch.zeros(3)

    def state_dict(self) -> dict:
        return {"count": self.count, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.seen = state["count"], state["seen"].clone()


def test_a_stage_adds_its_own_state_to_what_checkpoints_hold(tmp_path):
    def trainer(resume=None):
        cfg = TrainConfig(run_dir=str(tmp_path / "run"), steps=2, save_every=0, eval_every=0, progress=False,
                          device="cpu", resume=resume)
        return Trainer(cfg, tiny_model(), causal_lm_loss, RandomBatches(4))

    first, counter = trainer(), Counter()
    first.checkpointer.shared["counter"] = counter
    counter.count, counter.seen = 7, torch.tensor([1.0, 2.0, 3.0])
    first.fit()
    second, restored = trainer(resume="auto"), Counter()
    second.checkpointer.shared["counter"] = restored
    assert second.checkpointer.resume("auto")
    assert restored.count == 7 and torch.equal(restored.seen, torch.tensor([1.0, 2.0, 3.0]))
    third = trainer(resume="auto")  # a run that keeps more state than the checkpoint holds: named
    third.checkpointer.per_rank["missing"] = Counter()
    with pytest.raises(CheckpointError, match=r"rank0\.json: holds no 'missing' state"):
        third.checkpointer.resume(str(tmp_path / "run" / "checkpoint-000002"))
