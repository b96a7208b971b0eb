"""GGUF files read back (`lmforge.gguf_read`, what `lmforge eval --model FILE.gguf` scores): every family's f32
export comes back bit for bit with the same tokenizer; quantised files load as transformers' own GGUF loader
loads them; eval of a GGUF scores as eval of its directory, and as llama.cpp scores the same file; bad files
are one line naming the file and the key."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import gguf
import llama_cpp  # noqa: F401  (in the test extra)
import numpy as np
import pytest
import torch
from test_export_gguf import FAMILY_CASES, PROMPT, family_model, llama, varied_texts

from lmforge import cli, export
from lmforge.checkpoint import load_model
from lmforge.export import export_gguf
from lmforge.gguf_read import MAX_ARRAY, load_gguf, unpermute_for_llama
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(corpus):
    return corpus[0]


def test_unpermute_undoes_the_llama_permutation():
    w = torch.randn(4 * 8, 6)
    assert torch.equal(unpermute_for_llama(export.permute_for_llama(w, 4), 4), w)
    assert not torch.equal(export.permute_for_llama(w, 4), w)


@pytest.mark.parametrize("case", ["llama", *FAMILY_CASES])
def test_every_family_comes_back_bit_for_bit(case, tokenizer_dir, tmp_path):
    model_dir = family_model(case.split("-")[0], tokenizer_dir, tmp_path / "model", seed=1,
                             **FAMILY_CASES.get(case, {}))
    model, tokenizer = load_gguf(export_gguf(model_dir, tmp_path / "model.gguf", "f32"))
    reference = load_model(model_dir)
    ours, theirs = model.state_dict(), reference.state_dict()
    if case == "qwen2_moe":  # written untied (llama.cpp's qwen2moe has no fallback to the embedding)
        assert torch.equal(ours.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    ids = torch.tensor([Tokenizer.from_dir(tokenizer_dir).encode(PROMPT * 3)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    expected = {"mistral": "llama"}.get(reference.config.model_type, reference.config.model_type)
    assert model.config.model_type == expected


def test_the_tokenizer_splits_and_renders_as_the_original(tokenizer_dir, tmp_path):
    original = Tokenizer.from_dir(tokenizer_dir)
    model_dir = family_model("llama", tokenizer_dir, tmp_path / "model", hidden_size=32, intermediate_size=64)
    _, tokenizer = load_gguf(export_gguf(model_dir, tmp_path / "model.gguf", "q8_0"))
    texts = varied_texts(1000, seed=5)
    assert tokenizer.encode_batch(texts) == original.encode_batch(texts)
    assert [tokenizer.decode(ids) for ids in original.encode_batch(texts[:200])] == texts[:200]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ñ 日本"},
            {"role": "assistant", "content": "Hello."}]
    assert tokenizer.encode_chat(chat) == original.encode_chat(chat)
    assert tokenizer.stop_ids == original.stop_ids and tokenizer.special_ids == original.special_ids
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (original.eos_id, None, original.pad_id)


def test_a_llama3_tokenizer_comes_back_with_its_bos(tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(export.LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(varied_texts(3000, seed=3), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    Tokenizer(backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>").save(tmp_path / "tok")
    original = Tokenizer.from_dir(tmp_path / "tok")
    model_dir = family_model("llama", tmp_path / "tok", tmp_path / "model", hidden_size=32, intermediate_size=64)
    _, tokenizer = load_gguf(export_gguf(model_dir, tmp_path / "model.gguf", "q8_0"))
    texts = varied_texts(500, seed=6)
    assert tokenizer.encode_batch(texts) == original.encode_batch(texts)
    assert tokenizer.encode("Hi", add_special_tokens=True) == original.encode("Hi", add_special_tokens=True)
    assert tokenizer.encode("Hi", add_special_tokens=True)[0] == 0 == tokenizer.bos_id


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_quantised_files_load_as_transformers_loads_them(case, tokenizer_dir, tmp_path):
    """transformers' own GGUF loader (from_pretrained(gguf_file=...), which dequantises with the same package) is
    the reference for the types lmforge cannot compare with its own directory: q8_0, q4_0 and llama.cpp's q4_k_m.
    (Of the other families, its loader builds mixtral as a dense llama and qwen3 with its default head_dim.)"""
    from transformers import AutoModelForCausalLM

    model_dir = family_model(case, tokenizer_dir, tmp_path / "model", seed=3)
    ids = torch.tensor([Tokenizer.from_dir(tokenizer_dir).encode(PROMPT * 3)])
    for kind in ("q8_0", "q4_0", "q4_k_m"):
        path = export_gguf(model_dir, tmp_path / f"model-{kind}.gguf", kind)
        model, _ = load_gguf(path)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            ours, theirs = model(ids).logits, reference(ids).logits
        assert (ours - theirs).abs().max() < 1e-4, kind
        exact = load_model(model_dir)(ids).logits.detach()
        assert (ours - exact).abs().max() > 1e-4  # the quantised weights, not the directory's


def bits_per_byte(out: Path, task: str) -> float:
    return json.loads((out / "results.json").read_text())["results"][task]["bits_per_byte"]


def test_eval_of_a_gguf_scores_as_its_directory_and_as_llama_cpp(tokenizer_dir, corpus, tmp_path):
    """f32: the same bits per byte as the directory. q8_0: what llama.cpp computes from its own logits on the same
    tokens, within the difference its 8-bit activations make."""
    model_dir = family_model("llama", tokenizer_dir, tmp_path / "model", seed=4, train_steps=60)
    text = tmp_path / "text.txt"
    text.write_text((corpus[1].parent / "corpus.txt").read_text(encoding="utf-8")[-6000:], encoding="utf-8")
    task = f"bpb:{text}"
    scores = {}
    for name, model in (("dir", model_dir), ("f32", export_gguf(model_dir, tmp_path / "f32.gguf", "f32")),
                        ("q8_0", export_gguf(model_dir, tmp_path / "q8_0.gguf", "q8_0"))):
        args = ["eval", "--model", str(model), "--tasks", task, "--out", str(tmp_path / f"eval-{name}"),
                "--seq-len", "128"]
        assert cli.main(args) == 0
        scores[name] = bits_per_byte(tmp_path / f"eval-{name}", task)
    assert scores["f32"] == pytest.approx(scores["dir"], rel=1e-6)
    assert scores["q8_0"] != scores["f32"]

    # llama.cpp on the q8_0 file: the same 128-token windows, each scored from its own first token on
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    ids = tokenizer.encode(text.read_text(encoding="utf-8"))
    cpp = llama(tmp_path / "q8_0.gguf")
    nll = 0.0
    for start in range(0, len(ids) - 1, 128):
        window = ids[start:start + 128]
        if len(window) < 2:
            break
        cpp.reset()
        cpp.eval(window)
        logits = np.array(cpp.scores[:len(window)], dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        nll -= sum(logp[i, window[i + 1]] for i in range(len(window) - 1))
    print(f"bits per byte: dir {scores['dir']:.5f} f32.gguf {scores['f32']:.5f} q8_0.gguf {scores['q8_0']:.5f} "
          f"(nll {nll:.1f} nats by llama.cpp)", file=sys.stderr)
    ours = load_gguf(tmp_path / "q8_0.gguf")[0]
    ours_nll = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 128):
            window = ids[start:start + 128]
            if len(window) < 2:
                break
            logp = torch.log_softmax(ours(torch.tensor([window])).logits[0].double(), -1)
            ours_nll -= logp[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum().item()
    assert ours_nll == pytest.approx(nll, rel=2e-3)


# -- bad files --------------------------------------------------------------------------------------------------

def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def eval_error(path: Path, capsys) -> str:
    assert cli.main(["eval", "--model", str(path), "--tasks", "arithmetic", "--limit", "1"]) == 1
    return error_line(capsys)


def test_files_that_are_not_models_are_named(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    assert eval_error(path, capsys) == f"lmforge: error: model: no GGUF file '{path}'"
    path.write_bytes(b"PK\x03\x04 a zip file")
    assert eval_error(path, capsys) == f"lmforge: error: {path}: not a GGUF file (no GGUF magic)"
    # a few bytes that claim an array of 2^30 strings: refused before anything is built
    key = b"tokenizer.ggml.tokens"
    bomb = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IIQ", 9, 8, 1 << 30) + struct.pack("<Q", 1) + b"a")
    path.write_bytes(bomb)
    assert eval_error(path, capsys) == f"lmforge: error: {path}: tokenizer.ggml.tokens: an array of {1 << 30} items"
    assert MAX_ARRAY < 1 << 30
    path.write_bytes(bomb[:30])
    assert eval_error(path, capsys) == f"lmforge: error: {path}: ends inside its metadata (truncated?)"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    assert eval_error(path, capsys) == (f"lmforge: error: {path}: architecture 'gpt2' is not one lmforge runs "
                                        "(llama, qwen2, qwen3, qwen2moe, qwen3moe, deepseek2)")


def exported_with(monkeypatch, model_dir: Path, out: Path, method: str, value) -> Path:
    """An export whose GGUFWriter.<method> writes `value` instead of what it was given."""
    original = getattr(gguf.GGUFWriter, method)
    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, method, lambda self, *args: original(self, value))
        return export_gguf(model_dir, out, "q8_0")


def test_metadata_that_does_not_fit_is_named(tokenizer_dir, tmp_path, monkeypatch, capsys):
    model_dir = family_model("llama", tokenizer_dir, tmp_path / "model", hidden_size=32, intermediate_size=64)
    path = tmp_path / "bad.gguf"
    exported_with(monkeypatch, model_dir, path, "add_tokenizer_pre", "deepseek-v3")
    assert eval_error(path, capsys) == (f"lmforge: error: {path}: tokenizer.ggml.pre 'deepseek-v3' is not read "
                                        "(known: qwen2, llama-bpe)")
    exported_with(monkeypatch, model_dir, path, "add_tokenizer_model", "llama")
    assert eval_error(path, capsys) == (f"lmforge: error: {path}: tokenizer.ggml.model 'llama': only byte-level "
                                        "BPE ('gpt2') is read")
    exported_with(monkeypatch, model_dir, path, "add_block_count", 10**9)
    assert eval_error(path, capsys) == (f"lmforge: error: {path}: block_count 1000000000, but its tensors hold "
                                        "2 blocks")
    exported_with(monkeypatch, model_dir, path, "add_feed_forward_length", 48)
    assert eval_error(path, capsys) == (f"lmforge: error: {path}: 'blk.0.ffn_gate.weight' has shape (64, 32), its "
                                        "metadata implies (48, 32)")
    with monkeypatch.context() as patch:  # a string where a number belongs
        patch.setattr(gguf.GGUFWriter, "add_embedding_length",
                      lambda self, n: self.add_string(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=self.arch), str(n)))
        export_gguf(model_dir, path, "q8_0")
    assert eval_error(path, capsys) == (f"lmforge: error: {path}: metadata 'llama.embedding_length' is str, "
                                        "not int")
    with monkeypatch.context() as patch:
        tensors = export.hf_tensors
        patch.setattr(export, "hf_tensors", lambda model: (t for t in tensors(model) if "layers.1.mlp.up" not in t[0]))
        export_gguf(model_dir, path, "q8_0")
    assert eval_error(path, capsys) == (f"lmforge: error: {path}: no tensor 'blk.1.ffn_up.weight' "
                                        "(model.layers.1.mlp.up_proj.weight) for a llama model with this metadata")
