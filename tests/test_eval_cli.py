"""`lmforge eval` end to end on a tiny model: every built-in task and every KIND:PATH, one results.json; a PEFT
adapter directory scores as the merged model does; bad task names and files fail before any work."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("task-files")
    (d / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"question": "To be or not to", "choices": ["be", "sing", "run"], "answer": 0},
        {"question": "The king is", "choices": ["dead", "here"], "answer": "B"}]))
    (d / "gen.jsonl").write_text(json.dumps({"question": "Ava has 2 apples. She buys 3 more. How many?",
                                             "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    (d / "code.jsonl").write_text(json.dumps({"task_id": "t/0", "prompt": "def one():\n", "entry_point": "one",
                                              "test": "def check(f):\n    assert f() == 1\n"}) + "\n")
    (d / "text.txt").write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York.\n")
    return d


def test_every_task_kind(base_model, task_files, tmp_path, capsys):
    out = tmp_path / "eval"
    tasks = ["arithmetic", "shakespeare-cloze", "humaneval-mini", f"bpb:{task_files / 'text.txt'}",
             f"mc:{task_files / 'mc.jsonl'}", f"gen:{task_files / 'gen.jsonl'}", f"code:{task_files / 'code.jsonl'}"]
    assert cli.main(["eval", "--model", str(base_model), "--tasks", *tasks, "--limit", "2", "--max-tokens", "8",
                     "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == tasks
    assert results[f"mc:{task_files / 'mc.jsonl'}"]["n"] == 2
    assert 0 <= results["arithmetic"]["exact_match,strict-match"] <= 1
    assert results["humaneval-mini"]["pass@1"] == 0.0  # a random tiny model writes no working function
    assert results[f"bpb:{task_files / 'text.txt'}"]["bits_per_byte"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["task"] for s in samples} >= {"arithmetic", "shakespeare-cloze", "humaneval-mini"}
    printed = capsys.readouterr().out
    assert "bits_per_byte" in printed and "pass@1" in printed


def test_adapter_scores_as_merged(base_model, task_files, tmp_path):
    """An adapter directory is loaded on its base and merged: the same numbers as the merged model's directory."""
    from lmforge.checkpoint import load_model, save_model
    from lmforge.model.lora import LoraConfig, apply_lora, lora_modules, merge_lora, save_adapter

    model = apply_lora(load_model(base_model), LoraConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(0)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B, std=0.5)  # a new adapter's B is 0: make it change the model
    save_adapter(model, tmp_path / "adapter", base_model_path=str(base_model))
    save_model(merge_lora(model), tmp_path / "merged", tokenizer_dir=base_model)
    scores = {}
    for name in ("adapter", "merged", "base"):
        out = tmp_path / f"eval-{name}"
        model_dir = base_model if name == "base" else tmp_path / name
        assert cli.main(["eval", "--model", str(model_dir), "--tasks", f"mc:{task_files / 'mc.jsonl'}",
                         f"bpb:{task_files / 'text.txt'}", "--out", str(out)]) == 0
        scores[name] = json.loads((out / "results.json").read_text())["results"]
    bpb = f"bpb:{task_files / 'text.txt'}"
    assert scores["adapter"][bpb]["bits_per_byte"] == pytest.approx(scores["merged"][bpb]["bits_per_byte"], rel=1e-5)
    assert scores["adapter"][bpb]["bits_per_byte"] != pytest.approx(scores["base"][bpb]["bits_per_byte"], rel=1e-3)


def test_bad_tasks_fail_before_loading(tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", f"mc:{missing}"]) == 1
    assert f"no such file or directory {missing}" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", "arithmetic"]) == 1
    assert "is not a directory" in capsys.readouterr().err
