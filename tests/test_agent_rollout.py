"""GRPO with the sandbox inside its rollouts (train/agent_rollout.py): an episode's completion is the conversation
the chat template renders, token for token, with the model's tokens trained on and the observations' not; the
budget truncates; and `lmforge grpo --sandbox true` trains a model taught one CodeAct episode, its sandbox running
the model's own code."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from train_helpers import memorize

from lmforge import cli
from lmforge.checkpoint import load_model, save_model
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.train.agent_rollout import AgentSampler, agent_messages

QUESTION = [{"role": "user", "content": "What is 6 times 7?"}]
CODE_REPLY = "Let me compute it.\n```python\nprint(6 * 7)\n```\nIt prints 42, surely."  # the tail is imagined
FINAL_REPLY = "The product is 42.\n#### 42"

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Output:
    token_ids: list[int]
    text: str
    finish_reason: str = "stop"


@dataclass
class ScriptedSampler:
    """rollout.Sampler's `complete`, replying from a script: reply k of every episode is replies[k]."""

    tokenizer: Tokenizer
    replies: list[str]
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=500))
    prompts: list[list[int]] = field(default_factory=list)

    def complete(self, prompts, params):
        self.prompts += prompts
        outputs = []
        for prompt, p in zip(prompts, params):
            turn = (sum(1 for t in prompt if t == self.end) - self.prompt_turns) // 2  # each step: reply, tool
            ids = self.tokenizer.encode(self.replies[turn]) + [self.end]
            cut = ids[:p.max_tokens]
            outputs.append(Output(cut, self.tokenizer.decode(cut, skip_special_tokens=True),
                                  "stop" if len(cut) == len(ids) else "length"))
        return outputs

    @property
    def end(self) -> int:
        return self.tokenizer.token_to_id("<|im_end|>")

    prompt_turns: int = 0


def scripted(tokenizer, replies, budget=500):
    sampler = ScriptedSampler(tokenizer, replies)
    messages = agent_messages(QUESTION)
    prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    sampler.prompt_turns = sum(1 for t in prompt if t == sampler.end)
    agent = AgentSampler(sampler, tokenizer, budget, max_steps=3)
    return agent([messages], [prompt], [0], 2), prompt, messages, sampler


def test_an_episode_is_the_rendered_conversation_with_observations_masked(corpus):
    tokenizer = Tokenizer.from_dir(corpus[0])
    outputs, prompt, messages, sampler = scripted(tokenizer, [CODE_REPLY, FINAL_REPLY])
    assert len(outputs) == 2
    for out in outputs:
        assert out.steps == 1 and out.finish_reason == "stop" and out.text == FINAL_REPLY
        cut = CODE_REPLY[:CODE_REPLY.index("```\n", CODE_REPLY.index("```python") + 3) + 3]
        conversation = [*messages, {"role": "assistant", "content": cut}, {"role": "tool", "content": "42"},
                        {"role": "assistant", "content": FINAL_REPLY}]
        rendered = tokenizer.render_chat(conversation)
        # the prompt and completion are the template's text of the whole episode (the real output, 42, in it)
        assert tokenizer.decode(prompt + out.token_ids) == rendered.rstrip("\n")
        # trained on: exactly the model's two replies, each closed by its turn's end
        trained = tokenizer.decode([t for t, m in zip(out.token_ids, out.mask) if m])
        assert trained == f"{cut}<|im_end|>{FINAL_REPLY}<|im_end|>"
        masked = tokenizer.decode([t for t, m in zip(out.token_ids, out.mask) if not m])
        assert "<tool_response>\n42\n</tool_response>" in masked and "It prints" not in masked + trained
    assert len(sampler.prompts) == 4  # two waves of two episodes


def test_the_budget_truncates_an_episode(corpus):
    tokenizer = Tokenizer.from_dir(corpus[0])
    code = len(tokenizer.encode(CODE_REPLY))
    outputs, *_ = scripted(tokenizer, [CODE_REPLY, FINAL_REPLY], budget=code + 12)
    for out in outputs:
        assert out.finish_reason == "length" and len(out.token_ids) <= code + 12
        assert len(out.mask) == len(out.token_ids)


def test_a_reply_without_code_is_the_answer_and_runs_nothing(corpus):
    tokenizer = Tokenizer.from_dir(corpus[0])
    outputs, *_ = scripted(tokenizer, [FINAL_REPLY])
    assert all(o.steps == 0 and all(o.mask) and o.text == FINAL_REPLY for o in outputs)


def teach(model_dir, tokenizer_dir, out, steps: int = 80):
    """The tiny policy trained on one CodeAct episode (the code's real output in it) until it repeats it."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model = load_model(model_dir)
    cut = CODE_REPLY[:CODE_REPLY.index("It prints")].rstrip("\n")
    episode = [*agent_messages(QUESTION), {"role": "assistant", "content": cut}, {"role": "tool", "content": "42"},
               {"role": "assistant", "content": FINAL_REPLY}]
    ids, mask = tokenizer.encode_chat(episode)
    return save_model(memorize(model, ids, mask, steps, 1e-2), out, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def taught(corpus, tmp_path_factory):
    from train_helpers import tiny_model

    root = tmp_path_factory.mktemp("agent-rl")
    base = save_model(tiny_model(seed=3, vocab_size=300, max_position_embeddings=512), root / "base",
                      tokenizer_dir=corpus[0])
    return teach(base, corpus[0], root / "taught")


def test_grpo_with_the_sandbox_trains_on_episodes(taught, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": QUESTION[0]["content"], "answer": "#### 42"}) + "\n"
                               for _ in range(4)))
    run = tmp_path / "run"
    args = ["grpo", "--model", str(taught), "--prompts", str(prompts), "--val-prompts", str(prompts),
            "--max-val-prompts", "2", "--sandbox", "true", "--num-generations", "4", "--batch-size", "4",
            "--max-completion-length", "160", "--temperature", "0.7", "--train.steps", "2",
            "--train.optim.lr", "1e-5", "--train.eval-every", "2", "--train.run-dir", str(run),
            "--train.log-every", "1", "--train.save-every", "0"]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 2
    # the taught policy writes the code, reads the sandbox's 42 and answers it: most episodes are right
    assert trained[0]["rewards/exact_answer/mean"] >= 0.5
    assert [r["val_accuracy"] for r in rows if "val_accuracy" in r][-1] == 1.0
