"""Fine-tuning samples: labels on assistant replies only, truncation, padding, packing, preference batches."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.data.formats import builtin_shakespeare, read_conversations
from lmforge.data.preference import collate_kto, collate_pairs, read_kto, read_pairs, tokenize_pair
from lmforge.data.sft import (
    IGNORE_INDEX,
    SFTDataset,
    SFTSample,
    collate,
    keep_last_runs,
    pack,
    sft_batches,
    shuffled,
    tokenize_conversation,
)
from lmforge.tokenizer import train_tokenizer

DATA = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(builtin_shakespeare()[:1], vocab_size=400, out_dir=out, show_progress=False)


def trained_text(tok, sample):
    return tok.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_labels_cover_every_reply_or_the_last_only(tok):
    chat = list(read_conversations(DATA / "minimind.jsonl"))[1]  # system + two turns
    sample, truncated = tokenize_conversation(tok, chat, max_len=512)
    assert not truncated and len(sample.labels) == len(sample.input_ids)
    assert trained_text(tok, sample) == "Red.<|im_end|>Blue.<|im_end|>"
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(sample.labels, sample.input_ids))
    last, _ = tokenize_conversation(tok, chat, max_len=512, loss_on="last")
    assert trained_text(tok, last) == "Blue.<|im_end|>" and last.input_ids == sample.input_ids
    with pytest.raises(ValueError, match="loss_on"):
        tokenize_conversation(tok, chat, max_len=512, loss_on="first")


def test_keep_last_runs():
    assert keep_last_runs([0, 1, 1, 0, 1, 0, 1, 1], 1) == [0, 0, 0, 0, 0, 0, 1, 1]
    assert keep_last_runs([0, 1, 1, 0, 1, 0, 1, 1], 2) == [0, 0, 0, 0, 1, 0, 1, 1]
    assert keep_last_runs([1, 1, 0], 5) == [1, 1, 0]


def test_dataset_reads_all_formats_and_counts_truncation(tok, tmp_path):
    files = [DATA / f"{name}.jsonl" for name in ("minimind", "openai", "sharegpt", "alpaca", "prompt_completion")]
    full = list(SFTDataset(files, tok, max_len=4096))
    assert len(full) == 9
    for sample in full:  # every sample trains on something and ends its last reply with <|im_end|>
        trained = [t for t in sample.labels if t != IGNORE_INDEX]
        assert trained and trained[-1] == tok.token_to_id("<|im_end|>")
    # The tool-calling chat trains on the call and on the final answer, not on the tool's result.
    assert trained_text(tok, full[2]) == ('<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 5}}\n'
                                          "</tool_call><|im_end|>4 + 5 = 9.<|im_end|>")
    lengths = sorted(len(s.input_ids) for s in full)
    max_len = lengths[4]
    dataset = SFTDataset(files, tok, max_len=max_len)
    cut = list(dataset)
    assert all(len(s.input_ids) <= max_len for s in cut)
    assert dataset.stats.truncated == sum(length > max_len for length in lengths) > 0
    assert dataset.stats.records == 9 and len(cut) == 9 - dataset.stats.dropped
    assert "truncated to max_len" in dataset.stats.summary()
    # A cut that leaves no reply token drops the sample (it would only add a NaN loss).
    tiny = SFTDataset(DATA / "minimind.jsonl", tok, max_len=4)
    assert list(tiny) == [] and tiny.stats.dropped == 2


def test_dataset_skip_bad(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(good) + "\n{broken\n" + json.dumps(good) + "\n")
    dataset = SFTDataset(path, tok, max_len=64, skip_bad=True)
    assert len(list(dataset)) == 2 and dataset.stats.skipped == 1
    assert "line 2: malformed JSON" in dataset.stats.summary()


def test_padded_batches(tok):
    samples = [SFTSample([5, 6, 7], [IGNORE_INDEX, 6, 7]), SFTSample([8], [8])]
    batch = collate(samples, pad_id=tok.pad_id)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == torch.long
    batches = list(sft_batches(samples * 3, batch_size=4, pad_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]


def test_packing_restarts_positions_and_numbers_documents():
    samples = [SFTSample([1, 2, 3], [-100, 2, 3]), SFTSample([4, 5], [4, 5]), SFTSample([6, 7, 8, 9], [6, 7, 8, 9]),
               SFTSample([10], [10])]
    assert [[len(s.input_ids) for s in row] for row in pack(samples, max_len=6)] == [[3, 2], [4, 1]]
    (batch,) = sft_batches(samples, batch_size=2, pad_id=0, packed=True, max_len=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 1, -1]]
    # The first token of each packed sample is never a target (it would be predicted from another sample).
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100], [-100, 7, 8, 9, -100, -100]]
    with pytest.raises(ValueError, match="does not fit"):
        list(pack([SFTSample([1] * 7, [1] * 7)], max_len=6))


def test_packed_attention_keeps_samples_apart(tok):
    """A causal mask restricted to equal document ids makes a packed row compute what each sample alone
    would: checked here on a toy attention over real packed samples."""
    samples = list(SFTDataset(DATA / "minimind.jsonl", tok, max_len=512))
    (batch,) = sft_batches(samples, batch_size=1, pad_id=tok.pad_id, packed=True, max_len=256)
    torch.manual_seed(0)
    embed = torch.nn.Embedding(tok.vocab_size, 8)

    def attend(ids, positions, documents):
        x = embed(ids) + positions[:, None].float()
        n = len(ids)
        allowed = torch.ones(n, n).tril().bool() & (documents[:, None] == documents[None, :])
        scores = (x @ x.T).masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1) @ x

    packed = attend(batch["input_ids"][0], batch["position_ids"][0], batch["document_ids"][0])
    start = 0
    for sample in samples:
        n = len(sample.input_ids)
        alone = attend(torch.tensor(sample.input_ids), torch.arange(n), torch.zeros(n))
        assert torch.allclose(packed[start : start + n], alone, atol=1e-5)
        start += n


def test_shuffled_is_seeded_and_complete():
    assert sorted(shuffled(range(100), buffer_size=10, seed=0)) == list(range(100))
    assert list(shuffled(range(100), 10, seed=0)) == list(shuffled(range(100), 10, seed=0))
    assert list(shuffled(range(100), 10, seed=0)) != list(shuffled(range(100), 10, seed=1))
    assert list(shuffled(range(100), 10, seed=0)) != list(range(100))


def test_preference_batches(tok):
    implicit, explicit = read_pairs(DATA / "dpo.jsonl")
    item = tokenize_pair(tok, implicit, max_len=256)
    chosen = tok.decode([t for t in item["chosen_labels"] if t != IGNORE_INDEX])
    rejected = tok.decode([t for t in item["rejected_labels"] if t != IGNORE_INDEX])
    assert (chosen, rejected) == ("4<|im_end|>", "5<|im_end|>")
    # Same prompt tokens on both sides; only the completions differ.
    prompt_ids, _ = tok.encode_chat(implicit.prompt, add_generation_prompt=True)
    assert item["chosen_input_ids"][: len(prompt_ids)] == item["rejected_input_ids"][: len(prompt_ids)] == prompt_ids
    batch = collate_pairs([item, tokenize_pair(tok, explicit, max_len=256)], pad_id=tok.pad_id)
    assert set(batch) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert len({tuple(t.shape) for t in batch.values()}) == 1  # one length: chosen and rejected can be stacked
    assert tokenize_pair(tok, implicit, max_len=3) is None  # nothing left of the completions


def test_multi_turn_prompt_trains_only_on_the_completion(tok):
    pair = next(iter(read_pairs(DATA / "dpo.jsonl")))
    pair.prompt = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}] + pair.prompt
    item = tokenize_pair(tok, pair, max_len=256)
    assert tok.decode([t for t in item["chosen_labels"] if t != IGNORE_INDEX]) == "4<|im_end|>"


def test_kto_batch(tok):
    batch = collate_kto(list(read_kto(DATA / "kto.jsonl")), tok, max_len=256)
    assert batch["kto_label"].tolist() == [1, 0]
    assert tok.decode([t for t in batch["labels"][1].tolist() if t != IGNORE_INDEX]) == "11<|im_end|>"
    with pytest.raises(ValueError, match="no sample"):
        collate_kto(list(read_kto(DATA / "kto.jsonl")), tok, max_len=2)

