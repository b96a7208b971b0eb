"""Bad or hostile input to the commands that read files: huge lines and samples stay bounded, small corpora
get a validation split, bad records are skipped with --skip-bad, and every error is one line naming its source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge import cli
from lmforge.data import formats
from lmforge.data.formats import DataError, builtin_shakespeare, iter_text_pieces, read_with
from lmforge.data.sft import SFTDataset
from lmforge.tokenizer import Tokenizer

QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def shakespeare(chars: int) -> str:
    text = "".join(p.read_text(encoding="utf-8") for p in builtin_shakespeare()[:3])
    return text[:chars]


def error_line(capsys) -> str:
    """The error a command printed: the last line of its stderr (after any progress bar), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1].split("\r")[-1]


# -- validation splits of small corpora (item 9) -------------------------------------------------------

@pytest.mark.parametrize("chars", [1_100_000, 3_000])
def test_prepare_defaults_hold_out_part_of_a_single_small_file(tmp_path, corpus, chars):
    tokenizer_dir, _ = corpus
    text = shakespeare(chars)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    assert cli.main(["prepare", "--tokenizer", str(tokenizer_dir), "--data", str(tmp_path / "input.txt"),
                     "--out", str(tmp_path / "data"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    total = manifest["train"]["tokens"] + manifest["val"]["tokens"]
    assert 0.002 * total < manifest["val"]["tokens"] < 0.05 * total  # about 1%, the default val_fraction
    # the pieces were cut where tokens do not change: together they are the whole file's tokens (+ its end)
    assert total == len(Tokenizer.from_dir(tokenizer_dir).encode(text)) + 1


def test_a_corpus_too_small_for_a_validation_split_is_a_clear_error(tmp_path, corpus, capsys):
    (tmp_path / "input.txt").write_text("To be, or not to be.\n" * 20, encoding="utf-8")
    assert cli.main(["prepare", "--tokenizer", str(corpus[0]), "--data", str(tmp_path / "input.txt"),
                     "--out", str(tmp_path / "data"), "--workers", "1"]) == 1
    assert error_line(capsys).startswith(f"lmforge: error: {tmp_path / 'input.txt'}: 420 bytes of text make 10 "
                                         "pieces, too few for a validation split of 0.01")


# -- long lines and huge records (item 7) ----------------------------------------------------------------

def test_a_single_huge_line_is_read_in_bounded_pieces_with_the_same_tokens(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(formats, "LINE_READ_BYTES", 8192)
    monkeypatch.setattr(formats, "HARD_CUT_BYTES", 16384)
    line = shakespeare(200_000).replace("\n", " ")  # one line of 200 KB
    (tmp_path / "line.txt").write_text(line, encoding="utf-8")
    pieces = list(iter_text_pieces(tmp_path / "line.txt", piece_bytes=1024))
    assert "".join(p.text for p in pieces) == line and len(pieces) >= 200_000 // 2048
    assert max(len(p.text) for p in pieces) <= 2 * 1024  # cut inside the line every 1-2 piece_bytes
    tokenizer = Tokenizer.from_dir(corpus[0])
    assert sum((tokenizer.encode(p.text) for p in pieces), []) == tokenizer.encode(line)
    # a line without any place to cut is still cut, at HARD_CUT_BYTES
    (tmp_path / "blob.txt").write_text("x" * 50_000, encoding="utf-8")
    pieces = list(iter_text_pieces(tmp_path / "blob.txt", piece_bytes=1024))
    assert "".join(p.text for p in pieces) == "x" * 50_000 and max(len(p.text) for p in pieces) == 16384


def test_jsonl_records_over_the_limit_are_named_and_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n' + json.dumps({"text": "y" * 5000}) + '\n{"text": "three"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl, line 2: a line of more than 0 MiB"):
        list(read_with(path, lambda record: record))
    stats = formats.DataStats()
    assert [r.data["text"] for r in read_with(path, lambda record: record, True, stats)] == ["one", "three"]
    assert stats.skipped == 1


def test_a_huge_conversation_is_cut_before_it_is_tokenized(tmp_path, corpus, monkeypatch):
    tokenizer = Tokenizer.from_dir(corpus[0])
    huge = shakespeare(1_000_000)
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": huge}]}) + "\n")
    encoded = []
    batch = tokenizer.backend.encode_batch
    monkeypatch.setattr(type(tokenizer.backend), "encode_batch", lambda self, texts, **kw: (
        encoded.extend(len(t) for t in texts), batch(texts, **kw))[1], raising=True)
    samples = list(SFTDataset(str(path), tokenizer, max_len=64))
    assert max(encoded) <= tokenizer.chars_for_tokens(64 + 2) < 2_000  # not the million characters
    full, mask = tokenizer.encode_chat([{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": huge[:5000]}])
    assert samples[0].input_ids == full[:64]
    assert samples[0].labels == [t if m else -100 for t, m in zip(full[:64], mask[:64])]


# -- --skip-bad for fine-tuning data (item 8) ------------------------------------------------------------

def test_sft_skip_bad_skips_and_counts_what_it_cannot_use(tmp_path, base_model, chats, capsys):
    lines = chats.read_text().splitlines()[:8]
    lines.insert(2, '{"messages": [{"role": "user", "content": "x"}')  # malformed JSON
    lines.insert(5, json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                             {"role": "system", "content": "late"}]}))  # the template refuses it
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["sft", "--model", str(base_model), "--data", str(data), "--max-len", "64", "--batch-size", "2",
            "--train.steps", "2", "--train.run-dir", str(tmp_path / "run"), *QUIET]
    assert cli.main(args) == 1
    assert error_line(capsys) == (f"lmforge: error: {data}, line 3: malformed JSON: Expecting ',' delimiter at "
                                  "column 47")
    assert cli.main(args + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "data: skipped bad input: 8 records read, 2 skipped, 0 truncated to max_len, 0 dropped" in out
    assert f"{data}, line 6: the chat template cannot render this conversation: only the first message" in out


# -- one-line errors naming the file and field (item 10) -------------------------------------------------

def test_option_out_of_range_is_named(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--data", str(corpus[1]), "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert error_line(capsys) == "lmforge pretrain: error: batch_size: 0 is out of range (at least 1)"


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "manifest.json").write_text(""), r"manifest\.json: not valid JSON"),
    (lambda d: (d / "manifest.json").write_text("[]"), r"manifest\.json: expected a JSON object"),
    (lambda d: _edit_manifest(d, lambda m: m["train"].update(shards=["../../etc/passwd"])),
     r"manifest\.json: field 'train\.shards' should list file names in the data directory"),
    (lambda d: _edit_manifest(d, lambda m: m.pop("dtype")), r"manifest\.json: missing field 'dtype'"),
    (lambda d: (d / "train_00000.bin").write_bytes(b""), r"train_00000\.bin: 0 bytes, but manifest\.json says"),
    (lambda d: (d / "train_00000.bin").write_bytes((d / "train_00000.bin").read_bytes()[:-1]),
     r"train_00000\.bin: \d+ bytes, but manifest\.json says \d+ tokens of 2 bytes"),
    (lambda d: (d / "train_00000.bin").write_bytes(np.full(len((d / "train_00000.bin").read_bytes()) // 2, 999,
                                                           dtype=np.uint16).tobytes()),
     r"token id 999 in the train shards is outside the vocabulary of 300"),
])
def test_damaged_pretraining_data_is_named(tmp_path, corpus, base_model, capsys, damage, named):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(corpus[1], data)
    damage(data)
    assert cli.main(["pretrain", "--model", str(base_model), "--data", str(data), "--seq-len", "16",
                     "--batch-size", "2", "--train.steps", "1", "--train.run-dir", str(tmp_path / "run"), *QUIET]) == 1
    line = error_line(capsys)
    assert line.startswith("lmforge: error: ") and __import__("re").search(named, line), line


def _edit_manifest(data: Path, change) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    change(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))


def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, corpus, base_model, capsys):
    args = ["pretrain", "--model", str(base_model), "--data", str(corpus[1]), "--seq-len", "16", "--batch-size", "2",
            "--train.steps", "2", "--train.run-dir", str(tmp_path / "run"), *QUIET]
    assert cli.main(args) == 0
    checkpoint = tmp_path / "run" / "checkpoint-000002"
    (checkpoint / "model.safetensors").write_bytes(b"")
    size = json.loads((checkpoint / "trainer_state.json").read_text())["files"]["model.safetensors"]
    capsys.readouterr()
    assert cli.main(args + ["--train.steps", "3", "--resume", str(checkpoint)]) == 1
    assert error_line(capsys) == (f"lmforge: error: {checkpoint / 'model.safetensors'}: 0 bytes, but {size} were "
                                  "written (truncated or changed)")


def test_a_config_json_of_the_wrong_type_is_one_line(tmp_path, base_model, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "2"}))
    assert cli.main(["generate", "--model", str(model), "--prompt", "x", "--max-new-tokens", "1"]) == 1
    assert error_line(capsys) == (f"lmforge: error: {model / 'config.json'}: num_hidden_layers: '2' is not an "
                                  "integer >= 1")


@pytest.mark.parametrize("file, content, named", [
    ("tokenizer.json", "{", r"tokenizer\.json: not a tokenizers file"),
    ("tokenizer_config.json", "{", r"tokenizer_config\.json: not valid JSON"),
    ("tokenizer_config.json", "[]", r"tokenizer_config\.json: expected a JSON object"),
    ("tokenizer_config.json", '{"model_max_length": "x"}', r"tokenizer_config\.json: field 'model_max_length'"),
    ("tokenizer_config.json", '{"eos_token": 5}', r"tokenizer_config\.json: field 'eos_token' should be a token"),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"x": 1}}',
     r"tokenizer_config\.json: added_tokens_decoder\.x should map a token id"),
    ("special_tokens_map.json", "[1]", r"special_tokens_map\.json: expected a JSON object"),
    ("generation_config.json", "{", r"generation_config\.json: not valid JSON"),
])
def test_a_damaged_tokenizer_or_generation_config_is_one_line(tmp_path, base_model, capsys, file, content, named):
    import re
    import shutil

    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    (model / file).write_text(content)
    assert cli.main(["generate", "--model", str(model), "--prompt", "x", "--max-new-tokens", "1"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"lmforge: error: {model}/") and re.search(named, line), line


def test_a_chat_template_that_does_not_compile_is_named(tmp_path, base_model, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    (model / "chat_template.jinja").write_text("{% if %}")
    assert cli.main(["generate", "--model", str(model), "--prompt", "x", "--max-new-tokens", "1", "--chat"]) == 1
    assert error_line(capsys).startswith("lmforge: error: the chat template does not compile: ")


@pytest.mark.parametrize("change, named", [
    ({"r": "8"}, r"field 'r': '8' should be a rank, an integer >= 1"),
    ({"lora_alpha": None}, r"field 'lora_alpha': None should be a positive number"),
    ({"target_modules": [1]}, r"field 'target_modules': \[1\] should be module names (a string or a list of them)"),
])
def test_a_damaged_adapter_is_one_line(tmp_path, base_model, capsys, change, named):
    from lmforge.checkpoint import load_model
    from lmforge.model.lora import LoraConfig, apply_lora, save_adapter

    adapter = tmp_path / "adapter"
    save_adapter(apply_lora(load_model(base_model), LoraConfig(r=2)), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    args = ["merge", "--model", str(base_model), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]
    assert cli.main(args) == 1
    assert error_line(capsys) == f"lmforge: error: {adapter / 'adapter_config.json'}: " + named.replace("\\", "")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert cli.main(args) == 1
    assert error_line(capsys).startswith(f"lmforge: error: {adapter / 'adapter_model.safetensors'}: not a readable")


def test_a_context_longer_than_the_model_takes_is_refused(base_model, capsys):
    assert cli.main(["generate", "--model", str(base_model), "--prompt", "x", "--max-len", "100000"]) == 1
    assert error_line(capsys) == ("lmforge: error: max_len=100000: must be from 2 to the model's "
                                  "max_position_embeddings (128)")
