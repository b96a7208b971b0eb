"""Log-likelihood scoring (lmforge.eval.loglik) and the lm-evaluation-harness bridge (lmforge.eval.harness) on a
tiny model: against a direct computation from the model's logits, against transformers' AutoModelForCausalLM on
the saved directory, and against lm-evaluation-harness's own Hugging Face model (HFLM) and simple_evaluate on a
local task; bits per byte against a hand computation; the built-in held-out text against the prepared split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from lmforge.checkpoint import load_model
from lmforge.data.pretrain import Manifest
from lmforge.eval.loglik import (
    MultipleChoiceItem,
    bits_per_byte,
    heldout_pieces,
    loglikelihoods,
    multiple_choice,
    read_multiple_choice,
    rolling_loglikelihoods,
    rolling_windows,
    shakespeare_cloze,
)
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LEN = 128  # the base_model fixture's max_position_embeddings


@pytest.fixture(scope="module")
def loaded(base_model):
    return load_model(base_model).eval(), Tokenizer.from_dir(base_model)


@pytest.fixture(scope="module")
def hflm(base_model):
    """lm-evaluation-harness's own Hugging Face model (transformers' AutoModelForCausalLM) on the same directory."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(base_model), device="cpu", batch_size=4)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hand_loglikelihood(logits_of, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's loglikelihood computed directly, one unpadded sequence: trailing spaces of the context move to
    the continuation, the continuation is what encoding the whole adds to the context's tokens (EOS for an
    empty context: this tokenizer has no BOS), the last MAX_LEN + 1 tokens are kept, log_softmax, gather."""
    if context:
        kept = context.rstrip()
        context, continuation = kept, context[len(kept):] + continuation
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + continuation)[len(ctx):]
    else:
        ctx, cont = [tokenizer.eos_id], tokenizer.encode(continuation)
    ids = (ctx + cont)[-(MAX_LEN + 1):]
    logprobs = torch.log_softmax(logits_of(torch.tensor([ids[:-1]]))[0].double(), -1)[-len(cont):]
    target = torch.tensor(cont)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def greedy_pair(model, tokenizer) -> tuple[str, str]:
    """A (context, continuation) whose continuation is the model's greedy one and survives re-encoding."""
    for context in ["ROMEO:", "Thou art", "Enter the", "What say you", "And so"]:
        ids = tokenizer.encode(context)
        with torch.no_grad():
            for _ in range(3):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        text = tokenizer.decode(ids[-3:])
        if tokenizer.encode(context + text) == ids:
            return context, text
    raise AssertionError("no greedy continuation survives re-encoding")


def test_loglikelihoods_equal_hand_computation_transformers_and_lm_eval_hflm(loaded, base_model, hflm):
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    model, tokenizer = loaded
    pairs = [("Question: who loves Juliet?\nAnswer:", " Romeo"), ("", "Now is the winter"),
             ("To be, or not to be ", "that is the question"),  # a trailing space moves to the continuation
             ("O Romeo, Romeo! " * 40, "wherefore art thou"),  # longer than the model: truncated from the left
             greedy_pair(model, tokenizer)]
    assert len(tokenizer.encode(pairs[3][0])) > MAX_LEN
    model.train()
    ours = loglikelihoods(model, tokenizer, pairs, batch_size=3)  # padded batches of unequal lengths
    assert model.training  # scored in eval mode, the caller's mode given back
    model.eval()
    with torch.no_grad():
        hand = [hand_loglikelihood(lambda x: model(x).logits, tokenizer, *p) for p in pairs]
        hf_model = AutoModelForCausalLM.from_pretrained(base_model).eval()
        hf = [hand_loglikelihood(lambda x: hf_model(x).logits, tokenizer, *p) for p in pairs]
    harness = hflm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                 disable_tqdm=True)
    for reference in (hand, hf, harness):
        assert [g for _, g in ours] == [g for _, g in reference]
        assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in reference], abs=1e-4)
    assert ours[-1][1] and not ours[0][1]


def test_rolling_windows_and_loglikelihood_equal_lm_eval(loaded, hflm, corpus):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for length in (0, 1, 5, 16, 17, 55):
        tokens = list(range(100, 100 + length))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, 16, context_len=1)]
        assert rolling_windows(tokens, 7, 16) == theirs
    model, tokenizer = loaded
    texts = [(corpus[0].parent / "corpus.txt").read_text(encoding="utf-8")[:1500], "A short line."]
    assert len(tokenizer.encode(texts[0])) > 3 * MAX_LEN  # several windows, the last one short
    harness = hflm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                         disable_tqdm=True)
    assert rolling_loglikelihoods(model, tokenizer, texts) == pytest.approx(harness, abs=1e-3)


def test_bits_per_byte_equals_hand_computation(loaded, corpus, tmp_path):
    model, tokenizer = loaded
    text = (corpus[0].parent / "corpus.txt").read_text(encoding="utf-8")[2000:2600] + "café ½\n"
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    window = 16
    result = bits_per_byte(model, tokenizer, path, seq_len=window)
    tokens = tokenizer.encode(text)
    assert len(tokens) % window  # the last window is a short one
    # Token i is predicted from the window it falls in: [EOS] + tokens, at most `window` inputs, disjoint windows.
    seq, nll = [tokenizer.eos_id] + tokens, 0.0
    with torch.no_grad():
        for start in range(0, len(tokens), window):
            end = min(start + window, len(tokens))
            logits = model(torch.tensor([seq[max(end - window, 0):end]])).logits[0, -(end - start):]
            targets = torch.tensor(seq[start + 1:end + 1])
            nll -= torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).sum()
    n_bytes = len(text.encode("utf-8"))
    assert (result["tokens"], result["bytes"], result["windows"]) == (len(tokens), n_bytes, -(-len(tokens) // window))
    assert result["bits_per_byte"] == pytest.approx(float(nll) / math.log(2) / n_bytes, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(float(nll) / len(tokens)), rel=1e-5)
    cut = bits_per_byte(model, tokenizer, path, seq_len=window, max_bytes=100)
    assert cut["bytes"] == 100 and cut["tokens"] == len(tokenizer.encode(text[:100]))


def test_held_out_text_is_the_prepared_validation_split(loaded, corpus):
    """What builtin:shakespeare scores (heldout_pieces of the built-in corpus) is what `prepare` holds out:
    here on the fixture's corpus, prepared with val_fraction 0.1 and 4096-byte pieces."""
    model, tokenizer = loaded
    tokenizer_dir, data = corpus
    pieces = heldout_pieces([tokenizer_dir.parent / "corpus.txt"], 0.1, 4096)
    stream = [t for p in pieces for t in tokenizer.encode(p.text) + [tokenizer.eos_id] * p.ends_document]
    manifest = Manifest.load(data)
    shards = np.concatenate([np.fromfile(data / name, dtype=manifest.dtype) for name in manifest.val.shards])
    assert stream == shards.tolist()
    result = bits_per_byte(model, tokenizer, data, seq_len=64)
    assert result["tokens"] == manifest.val.tokens
    assert result["bytes"] == sum(len(p.text.encode("utf-8")) for p in pieces)
    assert 5 < result["bits_per_byte"] < 12  # a random model: about log2(300) bits per token
    cut = bits_per_byte(model, tokenizer, data, max_bytes=300)
    assert 250 < cut["bytes"] <= 300
    builtin = bits_per_byte(model, tokenizer, "builtin:shakespeare", max_bytes=400)
    assert 350 < builtin["bytes"] <= 400


def test_held_out_text_follows_prepare_on_small_corpora(loaded, corpus, tmp_path, monkeypatch):
    """Small corpora: prepare cuts one file of 20 KB into smaller pieces than 64 KB, and so must we; several short
    files are a document each, and a held-out one ends with EOS in the stream builtin:shakespeare scores too."""
    from lmforge.data.pretrain import prepare
    from lmforge.eval import loglik

    model, tokenizer = loaded
    text = (corpus[0].parent / "corpus.txt").read_text(encoding="utf-8")
    one = tmp_path / "one.txt"
    one.write_text(text[:20_000], encoding="utf-8")
    prepare(corpus[0], [str(one)], tmp_path / "one", val_fraction=0.2, workers=1, show_progress=False)
    pieces = heldout_pieces([one], 0.2)
    assert pieces and len(pieces[0].text) < 10_000  # a piece of the file, not all of it
    stream = [t for p in pieces for t in tokenizer.encode(p.text) + [tokenizer.eos_id] * p.ends_document]
    assert stream == np.fromfile(tmp_path / "one" / "val_00000.bin", dtype=np.uint16).tolist()

    files = [tmp_path / f"play{i}.txt" for i in range(4)]
    for i, file in enumerate(files):
        file.write_text(text[3000 * i:3000 * i + 2500], encoding="utf-8")
    prepare(corpus[0], [str(f) for f in files], tmp_path / "four", val_fraction=0.5, workers=1, show_progress=False)
    pieces = heldout_pieces(files, 0.5)
    assert len(pieces) == 2 and all(p.ends_document for p in pieces)
    monkeypatch.setattr(loglik, "_builtin_heldout", lambda val_fraction: tuple(pieces))
    assert bits_per_byte(model, tokenizer, "builtin:shakespeare") == bits_per_byte(model, tokenizer, tmp_path / "four")


ITEMS = [  # 2, 3 and 4 choices of very unequal lengths, so that acc and acc_norm disagree somewhere
    {"question": "Who loves Juliet?", "choices": ["Romeo", "the Prince of Verona and all of his court"], "answer": 0},
    {"question": "What colour is the sky", "choices": ["blue", "a pale and washed-out grey", "green"], "answer": 1},
    {"question": "Pick the longest", "choices": ["a", "bb", "a much longer answer than the rest", "c"], "answer": 2},
]


def test_multiple_choice_equals_hand_computation(loaded, tmp_path):
    model, tokenizer = loaded
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    result = multiple_choice(model, tokenizer, read_multiple_choice(path))
    preds, preds_norm = [], []
    with torch.no_grad():
        for item in ITEMS:
            lls = np.array([hand_loglikelihood(lambda x: model(x).logits, tokenizer,
                                               f"Question: {item['question']}\nAnswer:", " " + c)[0]
                            for c in item["choices"]])
            preds.append(int(np.argmax(lls)))
            preds_norm.append(int(np.argmax(lls / np.array([len(c) for c in item["choices"]]))))
    assert preds != preds_norm  # the fixture tells acc from acc_norm
    answers = [item["answer"] for item in ITEMS]
    acc = np.mean([p == a for p, a in zip(preds, answers)])
    chance = np.mean([1 / len(item["choices"]) for item in ITEMS])
    assert [(s["pred"], s["pred_norm"]) for s in result["samples"]] == list(zip(preds, preds_norm))
    assert result["metrics"] == pytest.approx({
        "acc": acc, "acc_norm": np.mean([p == a for p, a in zip(preds_norm, answers)]),
        "acc_chance_corrected": (acc - chance) / (1 - chance), "chance": chance, "n": 3})


def test_multiple_choice_equals_lm_eval_simple_evaluate(loaded, hflm, tmp_path, offline):
    """The same items as a local lm-eval task: run through our LM (run_lm_eval) and through lm-eval's own HFLM,
    the accuracies equal ours, and HFLM's per-choice log-likelihoods equal ours."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import run_lm_eval

    model, tokenizer = loaded
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    metric = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
    task = {"task": "lmforge_mc_fixture", "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf-datasets")},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "answer", "doc_to_choice": "{{choices}}", "metric_list": metric}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(yaml.safe_dump(task), encoding="utf-8")
    ours = multiple_choice(model, tokenizer, read_multiple_choice(data))

    through_ours = run_lm_eval(model, tokenizer, ["lmforge_mc_fixture"], include_path=tmp_path / "tasks")
    assert through_ours["lmforge_mc_fixture"]["n"] == 3
    by_path = run_lm_eval(model, tokenizer, [str(tmp_path / "tasks" / "mc.yaml")])  # reported under its path
    assert by_path[str(tmp_path / "tasks" / "mc.yaml")] == through_ours["lmforge_mc_fixture"]
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    through_hf = lm_eval.simple_evaluate(model=hflm, tasks=["lmforge_mc_fixture"], task_manager=manager)
    for name in ("acc", "acc_norm"):
        assert through_ours["lmforge_mc_fixture"][name] == ours["metrics"][name]
        assert through_hf["results"]["lmforge_mc_fixture"][f"{name},none"] == ours["metrics"][name]
    for sample in through_hf["samples"]["lmforge_mc_fixture"]:
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours["samples"][sample["doc_id"]]["loglikelihoods"], abs=1e-4)


def test_generate_until_is_greedy_and_stops_at_until(loaded):
    from lm_eval.api.instance import Instance

    from lmforge.eval.harness import harness_lm

    model, tokenizer = loaded
    context = "KING HENRY:\nOnce more unto the"
    ids = tokenizer.encode(context)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = tokenizer.decode(ids[-12:])
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    many = [f"never{i}" for i in range(16)] + [stop]  # more than the engine takes: the rest cut afterwards
    requests = [Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 0),
                Instance("generate_until", {}, (context, {"max_gen_toks": 12}), 1),
                Instance("generate_until", {}, (context, {"until": many, "max_gen_toks": 12}), 2)]
    out = harness_lm(model, tokenizer).generate_until(requests)
    assert out == [greedy.split(stop)[0], greedy, greedy.split(stop)[0]]


def test_run_lm_eval_without_lm_eval_says_how_to_install(loaded, monkeypatch):
    import sys

    from lmforge.eval.harness import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm_eval"):
        run_lm_eval(*loaded, ["arc_easy"])


def test_read_multiple_choice_layouts(tmp_path):
    records = [
        {"question": "q0", "choices": ["a", "b", "c"], "answer": 2},
        {"question": "q1", "choices": ["a", "b", "c"], "answer": "B"},
        {"question": "q2", "choices": ["yes", "no"], "answer": "no"},
        {"question": {"stem": "q3", "choices": [{"label": "1", "text": "x"}, {"label": "2", "text": "y"}]},
         "answerKey": "2"},
        {"question": "q4", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"},
        {"ctx": "A man sits down and", "endings": ["eats.", "flies.", "sings.", "sleeps."], "label": "3"},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    items = read_multiple_choice(path)
    assert [(i.question, i.answer) for i in items] == [("q0", 2), ("q1", 1), ("q2", 1), ("q3", 1), ("q4", 2),
                                                       ("A man sits down and", 3)]
    assert items[3].choices == ["x", "y"] and items[5].template == "{question}" and items[0].template is None
    assert read_multiple_choice(path, limit=2) == items[:2]


@pytest.mark.parametrize("bad, field", [
    ({"question": "q", "answer": 0}, "missing field 'choices'"),
    ({"question": "q", "choices": "a b", "answer": 0}, "field 'choices'"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "field 'choices'"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, "field 'choices'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "field 'answer'"),
    ({"question": "q", "choices": ["a", "b"], "answer": "E"}, "field 'answer'"),
    ({"question": 3, "choices": ["a", "b"], "answer": 0}, "field 'question'"),
])
def test_read_multiple_choice_errors_name_file_line_and_field(tmp_path, bad, field):
    path = tmp_path / "mc.jsonl"
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}, line 3: {field}"):
        read_multiple_choice(path)


def test_shakespeare_cloze_is_deterministic_held_out_and_well_formed():
    items = shakespeare_cloze(50, seed=0)
    assert items == shakespeare_cloze(50, seed=0) and items != shakespeare_cloze(50, seed=1)
    held_out = "\n".join(p.text for p in heldout_pieces("builtin:shakespeare"))
    for item in items:
        assert isinstance(item, MultipleChoiceItem) and len(set(item.choices)) == 4 == len(item.choices)
        assert len({len(c) for c in item.choices}) == 1  # one length: neither acc nor acc_norm can use it
        first, second, head = item.question.split("\n")
        assert f"{first}\n{second}\n" in held_out and f"{head} {item.choices[item.answer]}" in held_out
    assert len({item.answer for item in items}) == 4  # the right choice is not always in one place
