"""Prompts with reference answers, for reinforcement learning with checkable rewards (GRPO, PPO).

Record shapes (JSONL/Parquet):
    {"prompt": str or [messages], "answer": ...}
    {"messages": [messages], "answer": ...}     (a trailing assistant message, if any, is dropped)
    {"question": str, "answer": "... #### 42"}  GSM8K: the reference is the number after ####
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from lmforge.data.formats import DataStats, Record, check_messages, read_with

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


@dataclass
class RLPrompt:
    messages: list[dict]  # the conversation to complete, ending with a user turn
    answer: str  # the reference the reward compares against


def parse_gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution ("... #### 1,234" -> "1234"), or None without a ####."""
    match = _GSM8K_FINAL.search(text)
    return match.group(1).replace(",", "").strip() if match else None


def to_prompt(record: Record) -> RLPrompt:
    data = record.data
    if "question" in data:
        solution = record.get("answer")
        answer = parse_gsm8k_answer(solution)
        if answer is None:
            raise record.error("GSM8K 'answer' has no final '#### N'")
        return RLPrompt([{"role": "user", "content": record.get("question")}], answer)
    answer = record.get("answer", (str, int, float))
    if "messages" in data:
        messages = check_messages(record, record.get("messages", list))
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        prompt = record.get("prompt", (str, list))
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else check_messages(record, prompt, "prompt"))
    if not messages or messages[-1]["role"] != "user":
        raise record.error("the prompt should end with a user message")
    return RLPrompt(messages, str(answer))


def read_prompts(files, skip_bad: bool = False, stats: DataStats | None = None) -> Iterator[RLPrompt]:
    return read_with(files, to_prompt, skip_bad, stats)
