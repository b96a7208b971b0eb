"""Pretraining data: prepare (shards, manifest, split, atomic output) and the resumable, distributed loader."""

import json

import numpy as np
import pytest
import torch

from lmforge import cli
from lmforge.data.formats import DataError, builtin_shakespeare, iter_text_pieces
from lmforge.data.pretrain import Manifest, PretrainLoader, prepare
from lmforge.tokenizer import Tokenizer, train_tokenizer

PLAYS = builtin_shakespeare()[:2]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(PLAYS[:1], vocab_size=400, out_dir=out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def data_dir(tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare(tok_dir, PLAYS, out, val_fraction=0.05, workers=2, shard_tokens=40_000, piece_bytes=8192,
            show_progress=False)
    return out


def read_split(data_dir, split):
    manifest = Manifest.load(data_dir)
    info = getattr(manifest, split)
    return np.concatenate([np.fromfile(data_dir / name, dtype=manifest.dtype) for name in info.shards])


def test_shards_hold_every_document_and_the_manifest_counts_them(tok_dir, data_dir):
    tokenizer = Tokenizer.from_dir(tok_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == tokenizer.eos_id == 0
    assert manifest["tokenizer_sha256"] == tokenizer.sha256()
    assert [s["path"] for s in manifest["sources"]] == [str(p) for p in PLAYS]
    train, val = read_split(data_dir, "train"), read_split(data_dir, "val")
    assert len(train) == manifest["train"]["tokens"] == sum(manifest["train"]["shard_tokens"])
    assert len(manifest["train"]["shards"]) > 1 and max(manifest["train"]["shard_tokens"]) <= 40_000
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
    assert manifest["train"]["documents"] + manifest["val"]["documents"] == 2
    assert manifest["bytes"] == sum(p.stat().st_size for p in PLAYS)
    # Cutting a file into pieces does not change its tokens: all pieces together encode like the whole file.
    pieces = list(iter_text_pieces(PLAYS, piece_bytes=8192))
    encoded = [tokenizer.encode(p.text) + [tokenizer.eos_id] * p.ends_document for p in pieces]
    whole = [tokenizer.encode(p.read_text()) + [tokenizer.eos_id] for p in PLAYS]
    assert sum(encoded, []) == sum(whole, [])
    # Piece i is held out when round((i + 1) * f) > round(i * f), f = 0.05: every 20th piece from the 10th.
    held_out = [i for i in range(len(pieces)) if i % 20 == 9]
    assert val.tolist() == sum((encoded[i] for i in held_out), [])
    assert train.tolist() == sum((e for i, e in enumerate(encoded) if i not in held_out), [])


def test_output_does_not_depend_on_worker_count(tok_dir, data_dir, tmp_path):
    prepare(tok_dir, PLAYS, tmp_path / "one", val_fraction=0.05, workers=1, shard_tokens=40_000,
            piece_bytes=8192, show_progress=False)
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "one", split), read_split(data_dir, split))


def test_jsonl_documents_uint32_and_cli(tok_dir, tmp_path, capsys, monkeypatch):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"body": f"document number {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    assert cli.main(["prepare", "--tokenizer", str(tok_dir), "--data", str(docs), "--out", str(out),
                     "--text-field", "body", "--val-fraction", "0.1", "--workers", "1"]) == 0
    printed = capsys.readouterr()
    # the summary line; no progress bar, which redraws with carriage returns, when stderr is not a terminal
    assert "MB/s" in printed.out and "tokenizing" not in printed.err and "\r" not in printed.err
    manifest = Manifest.load(out)
    assert (manifest.train.documents, manifest.val.documents) == (36, 4)
    tokenizer = Tokenizer.from_dir(tok_dir)
    train = read_split(out, "train")
    assert tokenizer.decode(train.tolist()).split("<|endoftext|>")[:2] == ["document number 0", "document number 1"]
    # A vocabulary beyond 65535 ids needs uint32.
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70_000))
    prepare(tok_dir, docs, tmp_path / "wide", text_field="body", val_fraction=0.1, workers=1, show_progress=False)
    assert Manifest.load(tmp_path / "wide").dtype == "uint32"
    assert np.array_equal(read_split(tmp_path / "wide", "train"), train)


def test_failure_leaves_nothing_half_written(tok_dir, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(30)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    out = tmp_path / "out"
    prepare(tok_dir, good, out, val_fraction=0.1, workers=2, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: field 'text' should be str"):
        prepare(tok_dir, [good, bad], out, val_fraction=0.1, workers=2, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]  # no temp dir left
    # With skip_bad the bad line is counted and the rest is prepared; the old output is replaced.
    manifest = prepare(tok_dir, [good, bad], out, val_fraction=0.1, workers=2, skip_bad=True, show_progress=False)
    assert manifest.skipped == 1 and manifest.train.documents + manifest.val.documents == 31
    with pytest.raises(DataError, match="too few for a validation split"):
        prepare(tok_dir, bad, tmp_path / "tiny", val_fraction=0.01, skip_bad=True, workers=1, show_progress=False)
    assert not (tmp_path / "tiny").exists()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        prepare(tok_dir, good, tmp_path / "precious", workers=1, show_progress=False)


# -- loader -----------------------------------------------------------------------------------------


def test_windows_are_shifted_pairs_covering_the_stream_in_order(data_dir):
    loader = PretrainLoader(data_dir, batch_size=4, seq_len=32, shuffle=False)
    stream = torch.from_numpy(read_split(data_dir, "train").astype(np.int64))
    batches = [b for _, b in zip(range(len(loader)), loader)]
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert inputs.shape == (len(loader) * 4, 32) and inputs.dtype == torch.long
    # Window i is tokens [32 i, 32 i + 33): windows cross shard boundaries seamlessly.
    assert torch.equal(inputs.flatten(), stream[: inputs.numel()])
    assert torch.equal(targets.flatten(), stream[1 : inputs.numel() + 1])
    assert len(loader) == (len(stream) - 1) // 32 // 4


def test_shuffle_is_seeded_changes_per_epoch_and_covers_every_window(data_dir):
    def epoch_inputs(loader, epochs=1):
        it = iter(loader)
        return [torch.cat([next(it)[0] for _ in range(len(loader))]) for _ in range(epochs)]

    # batch_size 1, so that no incomplete last batch is dropped and an epoch is every window
    first, second = epoch_inputs(PretrainLoader(data_dir, batch_size=1, seq_len=64, seed=1), epochs=2)
    again = epoch_inputs(PretrainLoader(data_dir, batch_size=1, seq_len=64, seed=1))[0]
    other_seed = epoch_inputs(PretrainLoader(data_dir, batch_size=1, seq_len=64, seed=2))[0]
    ordered = epoch_inputs(PretrainLoader(data_dir, batch_size=1, seq_len=64, shuffle=False))[0]
    assert torch.equal(first, again) and not torch.equal(first, other_seed) and not torch.equal(first, second)

    def rows(t):
        return sorted(map(tuple, t.tolist()))

    assert rows(first) == rows(ordered) == rows(second)  # a permutation of the same windows


def test_ranks_get_disjoint_equal_shares(data_dir):
    world = 3
    loaders = [PretrainLoader(data_dir, batch_size=2, seq_len=64, seed=5, rank=r, world_size=world)
               for r in range(world)]
    assert len({len(loader) for loader in loaders}) == 1  # every rank runs the same number of steps
    seen = [{tuple(row) for x, _ in (next(it) for it in [iter(loader)] for _ in range(len(loader)))
             for row in x.tolist()} for loader in loaders]
    assert all(len(s) == 2 * len(loaders[0]) for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="rank 3"):
        PretrainLoader(data_dir, rank=3, world_size=3)


def test_resume_gives_the_same_next_batch_across_epochs(data_dir):
    loader = PretrainLoader(data_dir, batch_size=4, seq_len=64, seed=3, rank=1, world_size=2)
    it = iter(loader)
    for _ in range(len(loader) + 2):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round trip (run state files)
    expected = [next(it) for _ in range(3)]
    resumed = PretrainLoader(data_dir, batch_size=4, seq_len=64, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, iter(resumed)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="seq_len=64"):
        PretrainLoader(data_dir, batch_size=4, seq_len=32, seed=3, rank=1, world_size=2).load_state_dict(state)


def test_val_split_and_too_little_data(data_dir):
    val = PretrainLoader(data_dir, split="val", batch_size=2, seq_len=64, shuffle=False)
    x, _ = next(iter(val))
    assert torch.equal(x[0], torch.from_numpy(read_split(data_dir, "val")[:64].astype(np.int64)))
    with pytest.raises(ValueError, match="too few for one batch"):
        PretrainLoader(data_dir, split="val", batch_size=10_000, seq_len=64)
