"""Rollouts with the sandbox inside them (GRPO / RLOO `--sandbox true`): each sample is a CodeAct episode
(agent.py), not one reply, and only the model's own tokens are trained on.

One episode, for one sample of one prompt, in waves that batch every live episode through the one Engine:
1. the model replies to the conversation so far (the prompt, then its earlier turns and their observations);
2. a reply with an action (a ```python block or a `python` tool call: agent.find_action) is cut after the action,
   closed with the turn's end token (<|im_end|>), and the code runs as the next cell of the episode's
   PythonSession (sandbox_session.py); its observation is rendered by the chat template as the `tool` turn,
   and the next wave continues after it;
3. a reply with no action is the final answer, and the episode ends (also at --max-steps actions, or when the
   completion budget, max_completion_length tokens of replies and observations together, is spent: then it is
   truncated, finish_reason "length").
The sample's completion is every token after the prompt; its mask is 1 on the model's tokens and 0 on the
observations' (the template's tool turn and the next assistant opening), so the loss, the log-probabilities and
the KL see only what the policy chose, as in the multi-turn RL recipes (verl's, TRL's with tools). The rewards
score the final reply's text (`#### N` against the answer).

The tokens of the model's replies are the sampled ones, never re-tokenised: an observation's tokens are those of
the text the template adds between the end of the reply and the next reply, so what the policy is trained on is
what it generated, and the conversation's text is what `lmforge agent` would show it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lmforge.agent import find_action
from lmforge.data.codeact import SYSTEM_PROMPT
from lmforge.sandbox import SandboxConfig
from lmforge.sandbox_session import PythonSession
from lmforge.tokenizer import Tokenizer


@dataclass
class Episode:
    """One sample's episode: its conversation, its completion tokens and their mask, its session."""

    messages: list[dict]
    prompt: list[int]
    seed: int
    completion: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    text: str = ""  # the final reply (what the rewards read)
    finish_reason: str | None = None
    steps: int = 0
    session: PythonSession | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EpisodeOutput:
    """What Rollouts takes of an episode, in the shape of the Engine's Output."""

    token_ids: list[int]
    mask: list[int]
    text: str
    finish_reason: str
    steps: int


def agent_messages(messages: list[dict]) -> list[dict]:
    """The prompt's messages with the CodeAct system prompt first, unless they bring their own."""
    return messages if messages and messages[0].get("role") == "system" else \
        [{"role": "system", "content": SYSTEM_PROMPT}, *messages]


class AgentSampler:
    """Episodes of prompts through `sampler` (rollout.Sampler: the Engine over the current policy)."""

    def __init__(self, sampler, tokenizer: Tokenizer, max_completion_length: int, max_steps: int = 4,
                 max_observation_chars: int = 500, sandbox: SandboxConfig | None = None):
        self.sampler, self.tokenizer = sampler, tokenizer
        self.budget, self.max_steps = max_completion_length, max_steps
        self.max_observation_chars = max_observation_chars
        self.sandbox = sandbox or SandboxConfig(timeout=5.0)
        ends = [i for i in tokenizer.stop_ids if i != tokenizer.eos_id] or tokenizer.stop_ids
        self.end_of_turn = ends[0]  # the token the template closes an assistant turn with

    def __call__(self, messages: list[list[dict]], prompts: list[list[int]], seeds: list[int], n: int
                 ) -> list[EpisodeOutput]:
        """n episodes of each prompt, prompt by prompt; prompt i's episode j is seeded seeds[i] + j."""
        episodes = [Episode(list(m), p, s + j) for m, p, s in zip(messages, prompts, seeds) for j in range(n)]
        try:
            wave = 0
            while live := [e for e in episodes if not e.done]:
                params = [replace(self.sampler.params, n=1, seed=e.seed + 7919 * wave,
                                  max_tokens=self.budget - len(e.completion)) for e in live]
                outputs = self.sampler.complete([e.prompt + e.completion for e in live], params)
                for episode, output in zip(live, outputs):
                    self.step(episode, output)
                wave += 1
        finally:
            for episode in episodes:
                if episode.session is not None:
                    episode.session.close()
        return [EpisodeOutput(e.completion, e.mask, e.text, e.finish_reason, e.steps) for e in episodes]

    def step(self, episode: Episode, output) -> None:
        """One reply of an episode: its final answer, or its action run and the observation appended."""
        action = find_action({"content": output.text})
        if action is None or episode.steps == self.max_steps or output.finish_reason != "stop":
            episode.completion += output.token_ids
            episode.mask += [1] * len(output.token_ids)
            episode.text, episode.finish_reason = output.text, output.finish_reason
            return
        reply = output.text[:action.end]
        kept = self.tokens_through(output.token_ids, len(reply)) + [self.end_of_turn]
        if episode.session is None:
            episode.session = PythonSession(self.sandbox)
        observation = episode.session.run(action.code).observation(self.max_observation_chars)
        episode.steps += 1
        assistant = {"role": "assistant", "content": reply}
        tool = {"role": "tool", "content": observation}
        between = self.tokenizer.encode(self.turn_text(episode.messages, assistant, tool))
        episode.messages += [assistant, tool]
        if len(episode.completion) + len(kept) + len(between) >= self.budget:  # no room left to reply
            episode.completion += kept[:self.budget - len(episode.completion)]
            episode.mask += [1] * (len(episode.completion) - len(episode.mask))
            episode.text, episode.finish_reason = reply, "length"
            return
        episode.completion += kept + between
        episode.mask += [1] * len(kept) + [0] * len(between)

    def tokens_through(self, token_ids: list[int], chars: int) -> list[int]:
        """The shortest head of the reply's tokens whose text holds its first `chars` characters."""
        for k in range(1, len(token_ids) + 1):
            if len(self.tokenizer.decode(token_ids[:k])) >= chars:
                return token_ids[:k]
        return list(token_ids)

    def turn_text(self, messages: list[dict], assistant: dict, tool: dict) -> str:
        """The text the template puts after the assistant's turn-end token and before the next reply: the end
        of the assistant turn, the tool turn, and the next assistant opening."""
        closed = self.tokenizer.render_chat([*messages, assistant])
        following = self.tokenizer.render_chat([*messages, assistant, tool], add_generation_prompt=True)
        end = self.tokenizer.decode([self.end_of_turn])
        cut = closed.rindex(end) + len(end)
        if following[:cut] != closed[:cut]:
            raise ValueError("the chat template renders an assistant turn differently once a tool turn follows; "
                             "sandbox rollouts need the conversation's text to grow at its end")
        return following[cut:]
