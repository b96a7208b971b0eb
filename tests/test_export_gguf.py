"""`lmforge export --format gguf`, checked by llama.cpp itself (llama-cpp-python, in the test extra): the f32
file's greedy tokens and logits against lmforge's, every type's logits against f32's, llama.cpp's tokenizer
against lmforge's on a few thousand varied texts, the chat template as llama-cpp-python renders it, the
Ollama Modelfile, and bad input."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (in the test extra: a missing llama-cpp-python fails these tests, never skips them)
import numpy as np
import pytest
import torch

from lmforge import cli
from lmforge.checkpoint import load_model, save_model
from lmforge.config import ModelConfig
from lmforge.export import CHATML_OLLAMA, LLAMA3_PATTERN, TYPES, export_gguf, llama_cpp_template, permute_for_llama
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import build_model
from lmforge.tokenizer import Tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "ROMEO:\nWhat light"


def family_model(model_type: str, tokenizer_dir: Path, out: Path, seed: int = 0, train_steps: int = 0,
                 **overrides) -> Path:
    """A small model of a family with weights drawn at 4x the usual scale (sharper distributions than a fresh
    model's near-uniform ones, so greedy choices are not near-ties), saved with the tokenizer."""
    vocab = Tokenizer.from_dir(tokenizer_dir).vocab_size
    base = dict(model_type=model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                tie_word_embeddings=True, initializer_range=0.08)
    if model_type == "qwen2":
        base.update(attention_bias=True)
    if model_type in ("qwen3", "qwen3_moe"):
        base.update(qk_norm=True, head_dim=32)
    if model_type in ("qwen3_moe", "mixtral", "qwen2_moe"):  # mixtral's experts are intermediate_size wide
        base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128 if model_type == "mixtral" else 64)
    if model_type == "qwen2_moe":
        base.update(attention_bias=True, norm_topk_prob=False, shared_expert_intermediate_size=96)
    model = build_model(ModelConfig(**{**base, **overrides}), seed=seed)
    with torch.no_grad():  # norms and biases away from their 1 / 0 start, so a misnamed one would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    if train_steps:
        train(model, Tokenizer.from_dir(tokenizer_dir), train_steps)
    return save_model(model, out, tokenizer_dir=tokenizer_dir)


def train(model, tokenizer: Tokenizer, steps: int, seq: int = 64, batch: int = 8) -> None:
    """A few steps of next-token prediction on Shakespeare: a random model's greedy text is one token repeated,
    a trained one's is varied, which a greedy comparison needs."""
    from lmforge.data.formats import builtin_shakespeare

    text = builtin_shakespeare()[0].read_text(encoding="utf-8")[:60_000]
    ids = torch.tensor(tokenizer.encode(text))
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        rows = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])
        logits = model(rows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def llama(path: Path, **kw) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=1, n_batch=256,
                           verbose=False, **kw)


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    model = llama(path)
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float64)


def lmforge_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    model = load_model(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def tokenizer_dir(corpus):
    return corpus[0]


@pytest.fixture(scope="module")
def llama_dir(tokenizer_dir, tmp_path_factory):
    return family_model("llama", tokenizer_dir, tmp_path_factory.mktemp("llama") / "model", train_steps=150)


@pytest.fixture(scope="module")
def exported(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(llama_dir, out / f"model-{kind}.gguf", kind) for kind in TYPES}


def test_permutation_pairs_the_halves_of_each_head():
    # one head of dim 4: HF rotates (0, 2) and (1, 3) together, llama.cpp's llama layout (0, 1) and (2, 3)
    w = torch.arange(8.0).reshape(8, 1)  # two heads
    assert permute_for_llama(w, heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_f32_greedy_tokens_and_logits_equal_lmforges(llama_dir, exported):
    tokenizer = Tokenizer.from_dir(llama_dir)
    prompt = tokenizer.encode(PROMPT)
    engine = Engine(load_model(llama_dir), tokenizer, max_batch_size=1, max_len=256)
    ours = engine.generate([prompt], SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))[0][0].token_ids
    theirs = []
    for token in llama(exported["f32"]).generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 64:
            break
    assert len(ours) == 64 and len(set(ours)) > 2  # a trained model's text, not one token repeated
    assert theirs == ours
    ids = prompt + ours[:-1]
    reference, got = lmforge_logits(llama_dir, ids), llama_logits(exported["f32"], ids)
    print(f"f32: 64/64 greedy tokens equal; max |logit diff| {np.abs(got - reference).max():.2e} "
          f"(logits' std {reference.std():.2f})", file=sys.stderr)
    assert np.abs(got - reference).max() < 4e-3 * reference.std()


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    logits = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


@pytest.fixture(scope="module")
def held_out(tokenizer_dir) -> list[int]:
    """250 tokens of Shakespeare the model never trained on."""
    from lmforge.data.formats import builtin_shakespeare

    text = builtin_shakespeare()[1].read_text(encoding="utf-8")[:2000]  # the model trained on the first file
    return Tokenizer.from_dir(tokenizer_dir).encode(text)[:250]


# type: (least logit correlation with f32, most perplexity / f32's either way, most file size / f32's)
BOUNDS = {"f16": (0.9999, 1.001, 0.6), "bf16": (0.999, 1.005, 0.6), "q8_0": (0.999, 1.01, 0.4),
          "q4_0": (0.97, 1.1, 0.3)}


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_every_type_loads_and_its_logits_follow_f32s(exported, held_out, kind):
    reference, got = llama_logits(exported["f32"], held_out), llama_logits(exported[kind], held_out)
    corr = np.corrcoef(reference.ravel(), got.ravel())[0, 1]
    top1 = (reference.argmax(-1) == got.argmax(-1)).mean()
    ppl = perplexity(got, held_out) / perplexity(reference, held_out)
    size = exported[kind].stat().st_size / exported["f32"].stat().st_size
    print(f"{kind}: logit correlation with f32 {corr:.5f}, same top token {top1:.0%}, held-out perplexity "
          f"{perplexity(got, held_out):.3f} vs f32's {perplexity(reference, held_out):.3f}, size {size:.2f} of f32",
          file=sys.stderr)
    least_corr, most_ppl, most_size = BOUNDS[kind]
    assert corr > least_corr and abs(ppl - 1) < most_ppl - 1 and size < most_size


def test_a_bf16_checkpoint_goes_into_bf16_bit_for_bit(llama_dir, tokenizer_dir, tmp_path):
    import gguf

    model = load_model(llama_dir)
    stored = save_model(model, tmp_path / "bf16", tokenizer_dir=tokenizer_dir, dtype=torch.bfloat16)
    path = export_gguf(stored, tmp_path / "model.gguf", "bf16")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type.name == "BF16"
    ours = model.model.embed_tokens.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(np.asarray(embedding.data).view(np.int16).reshape(ours.shape), ours)


def test_k_quants_are_llama_cpps_own_mixes(tokenizer_dir, tmp_path):
    import gguf

    # rows of 256 (a K-quant's block): hidden 256, MLP 512
    model_dir = family_model("llama", tokenizer_dir, tmp_path / "model", seed=3, hidden_size=256,
                             intermediate_size=512, num_hidden_layers=1, initializer_range=0.02)
    ids = Tokenizer.from_dir(tokenizer_dir).encode(PROMPT + " through yonder window breaks?")
    f32 = llama_logits(export_gguf(model_dir, tmp_path / "f32.gguf", "f32"), ids)
    path = export_gguf(model_dir, tmp_path / "q4_k_m.gguf", "q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate.weight"] == "Q4_K" and types["blk.0.attn_v.weight"] == "Q6_K"
    corr = np.corrcoef(f32.ravel(), llama_logits(path, ids).ravel())[0, 1]
    size = path.stat().st_size / (tmp_path / "f32.gguf").stat().st_size
    print(f"q4_k_m: logit correlation with f32 {corr:.5f}, size {size:.2f} of f32", file=sys.stderr)
    assert corr > 0.98 and size < 0.25
    assert not list(tmp_path.glob(".*"))  # no f32 file left behind


MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1,
           scoring_func="sigmoid", expert_score_bias=True)
FAMILY_CASES = {"qwen2": {}, "qwen3": {}, "mistral": {}, "qwen3_moe": {}, "mixtral": {}, "qwen2_moe": {},
                "deepseek_v3": MLA,  # and with its routing in groups, a low-rank q, scaling, no renormalisation
                "deepseek_v3-groups": {**MLA, "q_lora_rank": 32, "n_group": 2, "topk_group": 1,
                                       "routed_scaling_factor": 2.5, "norm_topk_prob": False}}
# RoPE scaling, with an original context shorter than the prompt so that it matters
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
FAMILY_CASES.update({"llama-linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                     "llama-yarn": {"rope_scaling": YARN}, "qwen2-yarn": {"rope_scaling": YARN},
                     "deepseek_v3-yarn": {**MLA, "rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                                  "beta_fast": 32, "beta_slow": 1}}})


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_other_families_logits_equal_lmforges(case, tokenizer_dir, tmp_path):
    model_dir = family_model(case.split("-")[0], tokenizer_dir, tmp_path / "model", seed=1, **FAMILY_CASES[case])
    path = export_gguf(model_dir, tmp_path / "model.gguf", "f32")
    ids = Tokenizer.from_dir(tokenizer_dir).encode(PROMPT * 3)
    reference, got = lmforge_logits(model_dir, ids), llama_logits(path, ids)
    assert np.abs(got - reference).max() < 1e-2 * reference.std()
    assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_llama3_rope_scaling_goes_in_as_llama_cpps_frequency_factors(tokenizer_dir, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # short, so the positions here feel the scaling
    model_dir = family_model("llama", tokenizer_dir, tmp_path / "model", seed=2, rope_scaling=scaling)
    path = export_gguf(model_dir, tmp_path / "model.gguf", "f32")
    ids = Tokenizer.from_dir(tokenizer_dir).encode(PROMPT * 6)
    reference, got = lmforge_logits(model_dir, ids), llama_logits(path, ids)
    assert np.abs(got - reference).max() < 1e-2 * reference.std()


# -- the tokenizer ----------------------------------------------------------------------------------------

WORDS = ["the", "The", "THE", "naïve", "café", "Ærøskøbing", "straße", "Ελληνικά", "русский", "Україна", "日本語",
         "中文字符", "한국어", "ภาษาไทย", "हिन्दी", "عربي", "עברית", "emoji", "😀", "👍🏽", "👩‍💻", "🇫🇷", "❤️", "e\u0301",
         "ñ", "ß", "ﬁ", "İstanbul", "ǅ", "Ⅻ", "½", "²", "٣", "१२३", "x86_64", "foo_bar", "__init__", "camelCase",
         "don't", "I'M", "we'll", "you're", "it'S", "they'D", "'tis", "O'Neil", "rock'n'roll", "12345", "3.14159",
         "1,000,000", "0x1F", "-42", "1e-9", "v2.0", "2026-12-07", "http://example.com/a?b=c&d=e", "a@b.co",
         "#include", "<stdio.h>", "def", "f(x):", "return", "x+=1;", "{}", "[]", "()", "=>", "!==", "...", "—", "–",
         "«guillemets»", "“quotes”", "‘single’", "¿qué?", "¡hola!", "…", "©", "®", "™", "€", "$", "£", "¥", "%", "\\n"]
SPACES = [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "    ", "\t\t", "\u00a0", "\u3000",
          " \t \n", "", ""]
CODE = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        "if __name__ == '__main__':\n    main()\n", "SELECT * FROM t WHERE a = 'b';", "  x = [1, 2, 3]  # list\n",
        "<div class=\"a\">&amp;</div>", "fn main() -> Result<(), Box<dyn Error>> {}", "$ ls -la | grep .py\n"]


def varied_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 10 == 0:
            texts.append(rng.choice(CODE) * rng.randint(1, 2))
            continue
        pieces = [rng.choice(WORDS) + rng.choice(SPACES) for _ in range(rng.randint(1, 12))]
        if i % 7 == 0:
            pieces.append("".join(rng.choice(SPACES[:12]) for _ in range(rng.randint(1, 6))))
        if i % 5 == 0:
            pieces.append(str(rng.randint(0, 10**rng.randint(1, 12))))
        text = "".join(pieces)
        texts.append(text if i % 3 else text.strip())
    return texts


@pytest.fixture(scope="module")
def varied_tokenizer_dir(tmp_path_factory):
    """A tokenizer whose merges reach into every script of the texts (vocab 1500): the Shakespeare one only
    merges English."""
    out = tmp_path_factory.mktemp("varied")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(varied_texts(3000, seed=1)), encoding="utf-8")
    train_tokenizer([str(corpus)], vocab_size=1500, out_dir=out / "tokenizer", show_progress=False)
    return out / "tokenizer"


def _vocab_only(tokenizer_dir: Path, out: Path) -> llama_cpp.Llama:
    model_dir = family_model("llama", tokenizer_dir, out / "model", hidden_size=32, intermediate_size=64)
    path = export_gguf(model_dir, out / "model.gguf", "q8_0")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_llama_cpps_tokenizer_splits_as_lmforges_on_varied_texts(varied_tokenizer_dir, tmp_path):
    tokenizer = Tokenizer.from_dir(varied_tokenizer_dir)
    model = _vocab_only(varied_tokenizer_dir, tmp_path)
    texts = varied_texts(3000, seed=2)
    ours = tokenizer.encode_batch(texts)
    differ = [(t, o) for t, o in zip(texts, ours) if model.tokenize(t.encode(), add_bos=False, special=False) != o]
    print(f"tokenizer: {len(texts) - len(differ)}/{len(texts)} texts give the same ids "
          f"({sum(map(len, ours))} tokens)", file=sys.stderr)
    assert not differ, f"{len(differ)} differ, first: {differ[0][0]!r}"
    # and back: llama.cpp's detokenizer gives the text again
    for text, ids in list(zip(texts, ours))[:300]:
        assert model.detokenize(ids).decode() == text
    # special tokens are one token each when asked for, as in lmforge's encode
    chat = tokenizer.render_chat([{"role": "user", "content": "Hi ñ 日本"}], add_generation_prompt=True)
    assert model.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer.encode(chat)


def test_a_llama3_tokenizer_goes_in_as_llama_bpe_and_splits_alike(tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(varied_texts(3000, seed=3), trainer=trainer)
    Tokenizer(backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>").save(tmp_path / "tok")
    tokenizer = Tokenizer.from_dir(tmp_path / "tok")
    model = _vocab_only(tmp_path / "tok", tmp_path)
    assert model.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    texts = varied_texts(1000, seed=4)
    same = sum(model.tokenize(t.encode(), add_bos=False, special=False) == o
               for t, o in zip(texts, tokenizer.encode_batch(texts)))
    assert same == len(texts)


def test_chat_template_renders_alike_in_llama_cpp_python(exported, llama_dir):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokenizer = Tokenizer.from_dir(llama_dir)
    model = llama_cpp.Llama(model_path=str(exported["q8_0"]), vocab_only=True, verbose=False)
    template = model.metadata["tokenizer.chat_template"]
    assert "endgeneration" not in template and "{%- if true %}" in template
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    rendered = Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="")(messages=chat).prompt
    assert rendered == tokenizer.render_chat(chat, add_generation_prompt=True)
    # and llama.cpp's own C API (what llama-cli and llama-server use without --jinja) on the file's template
    import ctypes

    c_template = llama_cpp.llama_model_chat_template(model._model.model, None)
    messages = (llama_cpp.llama_chat_message * len(chat))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in chat])
    buffer = ctypes.create_string_buffer(4096)
    length = llama_cpp.llama_chat_apply_template(c_template, messages, len(chat), True, buffer, len(buffer))
    assert buffer.raw[:length].decode() == rendered
    assert model.token_eos() == tokenizer.eos_id
    assert llama_cpp_template("{%- generation -%}x{% endgeneration %}") == "{%- if true -%}x{% endif %}"


# -- the command --------------------------------------------------------------------------------------------

def test_ollama_format_writes_a_modelfile_beside_the_gguf(llama_dir, tmp_path, capsys):
    assert cli.main(["export", "--model", str(llama_dir), "--format", "ollama", "--out", str(tmp_path / "m.gguf"),
                     "--type", "q8_0"]) == 0
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\n") and (tmp_path / "m.gguf").is_file()
    assert f'TEMPLATE """{CHATML_OLLAMA}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER num_ctx 256\n" in text  # the model's context
    # the template's ChatML pieces are the ones lmforge's own template writes
    rendered = Tokenizer.from_dir(llama_dir).render_chat([{"role": "user", "content": "Q"}],
                                                         add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n" in CHATML_OLLAMA
    assert "<|im_start|>assistant\n{{ end }}" in CHATML_OLLAMA


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_bad_input_is_one_line_naming_it(tmp_path, llama_dir, tokenizer_dir, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["export", "--model", str(missing), "--out", str(tmp_path / "a.gguf")]) == 1
    assert error_line(capsys) == f"lmforge: error: --model: no model directory '{missing}'"

    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--model", str(llama_dir), "--out", str(tmp_path / "a.gguf"), "--type", "iq2_xs"])
    assert exit_.value.code == 2 and "iq2_xs" in error_line(capsys)

    mla = family_model("deepseek_v3", tokenizer_dir, tmp_path / "mla", rope_interleave=False, **MLA)
    assert cli.main(["export", "--model", str(mla), "--out", str(tmp_path / "a.gguf")]) == 1
    assert error_line(capsys) == (f"lmforge: error: {mla}: rope_interleave false: llama.cpp's deepseek2 rotates "
                                  "adjacent pairs")
    unnormalised = family_model("qwen3_moe", tokenizer_dir, tmp_path / "unnormalised", norm_topk_prob=False)
    assert cli.main(["export", "--model", str(unnormalised), "--out", str(tmp_path / "a.gguf")]) == 1
    assert error_line(capsys) == (f"lmforge: error: {unnormalised}: norm_topk_prob False: llama.cpp's qwen3_moe "
                                  "has True")

    gpt2 = Tokenizer.from_dir(tokenizer_dir)
    from tokenizers import pre_tokenizers
    gpt2.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    other = tmp_path / "other"
    save_model(load_model(llama_dir), other)
    gpt2.save(other)
    assert cli.main(["export", "--model", str(other), "--out", str(tmp_path / "a.gguf")]) == 1
    line = error_line(capsys)
    assert line.startswith("lmforge: error: tokenizer: its pre-tokenizer (") and "'qwen2', 'llama-bpe'" in line
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob(".a.gguf*"))

    from tokenizers import normalizers
    lower = Tokenizer.from_dir(tokenizer_dir)
    lower.backend.normalizer = normalizers.Lowercase()
    lower.save(other)
    assert cli.main(["export", "--model", str(other), "--out", str(tmp_path / "a.gguf")]) == 1
    assert error_line(capsys) == ("lmforge: error: tokenizer: its normalizer (Lowercase) is one llama.cpp's gpt2 "
                                  "tokenizer does not apply")
