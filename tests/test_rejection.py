"""Rejection sampling and reward functions: the kept completions are the best of each prompt's samples (those
the Engine gives with the same seeds), written as SFT conversations and preference pairs that the other stages
read; built-in rewards check answers as lm-evaluation-harness does; a user's `module:function` works."""

from __future__ import annotations

import json

import pytest
from train_helpers import tiny_model

from lmforge import cli
from lmforge.checkpoint import save_model
from lmforge.data.arithmetic import write_tasks
from lmforge.data.preference import read_pairs
from lmforge.data.prompts import read_prompts
from lmforge.data.sft import SFTDataset
from lmforge.infer.engine import Engine
from lmforge.infer.llm import encode_prompts
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.train.rewards import exact_answer, format_reward, load_reward_function

pytestmark = pytest.mark.usefixtures("one_thread")

VOWELS = '''
def vowels(prompts, completions, answer, **columns):
    """More vowels, more reward: a reward every completion differs on."""
    return [sum(ch in "aeiou" for ch in c[0]["content"]) for c in completions]


def wrong_length(prompts, completions, **columns):
    return [1.0]
'''


@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("rejection")
    save_model(tiny_model(seed=2, vocab_size=300, max_position_embeddings=256), root / "model",
               tokenizer_dir=corpus[0])
    write_tasks(root / "tasks", train=6, test=2)
    (root / "myrewards.py").write_text(VOWELS)
    return root


def args(setup, out, *extra):
    return ["rejection", "--model", str(setup / "model"), "--prompts", str(setup / "tasks" / "prompts.jsonl"),
            "--n", "4", "--max-new-tokens", "12", "--reward", "myrewards:vowels", "--out", str(out), *extra]


def test_the_best_of_each_prompts_samples_is_kept(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(setup)  # the user's reward module sits in the working directory
    out = tmp_path / "sft.jsonl"
    assert cli.main(args(setup, out, "--pairs-out", str(tmp_path / "pairs.jsonl"), "--seed", "3")) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    # the same samples from the Engine directly (prompt i's seed is seed + i * n)
    prompts = list(read_prompts(setup / "tasks" / "prompts.jsonl"))
    engine = Engine.from_pretrained(setup / "model", max_batch_size=8)
    ids = encode_prompts(engine.tokenizer, [p.messages for p in prompts])
    outputs = engine.generate(ids, [SamplingParams(max_tokens=12, n=4, seed=3 + 4 * i) for i in range(len(ids))])
    best = []
    for prompt, samples in zip(prompts, outputs):
        scores = [sum(ch in "aeiou" for ch in o.text) for o in samples]
        if max(scores) > 0:
            best.append(prompt.messages + [{"role": "assistant", "content": samples[scores.index(max(scores))].text}])
    assert [k["messages"] for k in kept] == best and best
    pairs = list(read_pairs(tmp_path / "pairs.jsonl"))
    assert pairs and all(p.chosen != p.rejected for p in pairs)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["prompts"] == 6 and summary["samples"] == 24 and summary["kept"] == len(best)
    assert len(list(SFTDataset(str(out), Tokenizer.from_dir(setup / "model"), max_len=512))) == len(best)
    # keep all above a threshold: every sample scoring more than 2
    assert cli.main(args(setup, tmp_path / "all.jsonl", "--seed", "3", "--keep", "all", "--threshold", "2")) == 0
    every = [json.loads(line)["messages"][-1]["content"] for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert every == [o.text for samples in outputs for o in samples if sum(ch in "aeiou" for ch in o.text) > 2]


def test_builtin_rewards_check_the_answer_and_format():
    completions = [[{"role": "assistant", "content": "4 + 3 = 7.\n#### 7"}],
                   [{"role": "assistant", "content": "It is 7"}], [{"role": "assistant", "content": "#### 8"}]]
    assert exact_answer([[]] * 3, completions, answer=["7", "7", "7"]) == [1.0, 0.0, 0.0]
    assert format_reward([[]] * 3, completions) == [1.0, 0.0, 1.0]
    assert load_reward_function("exact_answer") is exact_answer


def test_bad_reward_specs_and_functions_are_named(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(setup)
    assert cli.main(args(setup, tmp_path / "x.jsonl", "--reward", "nonsense")) == 1
    assert ("reward: 'nonsense' is neither a built-in reward (exact_answer, format, length), a reward model's "
            "directory, nor 'module:function'") in capsys.readouterr().err
    assert cli.main(args(setup, tmp_path / "x.jsonl", "--reward", "myrewards:missing")) == 1
    assert "reward: 'myrewards' has no function 'missing'" in capsys.readouterr().err
    assert cli.main(args(setup, tmp_path / "x.jsonl", "--reward", "myrewards:wrong_length")) == 1
    assert "gave 1 values for 4 completions" in capsys.readouterr().err
