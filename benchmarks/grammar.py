"""Constrained decoding's CPU cost: the grammar engines on the package index, side by side on lmforge's tokenizers
(issue 20: "choose by measurement, CPU cost per token included").

llguidance, xgrammar and outlines-core each get the same byte-level BPE tokenizers (trained here: 6400 tokens as
the presets use, and 32000 on Shakespeare and Python source for a larger vocabulary) and the same JSON schema (a
tool call's arguments: strings, an enum, an integer, an array of objects). Each then: sets up its tokenizer
(once per model), compiles the schema (once per request), and walks a valid document token by token, filling the
mask of allowed tokens before each token and consuming it (what the Engine does every decode step), checking that
the document's every token was allowed and that the grammar accepts the end. The installed size of each package
(and what it pulls in) is printed too.

Last line: one JSON object; "ratio" = the CPU time one request costs (compiling the schema, then a mask per token
of the document) with the cheaper of the other two engines / with llguidance, at vocabulary 32000 (llguidance is
what lmforge uses: see BENCHMARKS.md for why).

    python benchmarks/grammar.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days", "stops"],
          "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                         "days": {"type": "integer", "minimum": 1},
                         "stops": {"type": "array", "items": {
                             "type": "object", "required": ["name", "hours"], "additionalProperties": False,
                             "properties": {"name": {"type": "string"}, "hours": {"type": "number"}}}}}}
DOCUMENT = {"city": "Verona, by the Adige", "unit": "celsius", "days": 3,
            "stops": [{"name": "Juliet's house", "hours": 1.5}, {"name": "Arena", "hours": 2},
                      {"name": "Castelvecchio", "hours": 2.25}]}


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each of the 256 bytes as the printable character that stands for it."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return {c: b for b, c in chars.items()}


def llguidance_run(hf, vocab: int, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    ready = time.perf_counter()
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compiled = time.perf_counter()
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    times = []
    for token in ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t)
        assert allowed(mask[0], token) and matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()
    return {"setup_ms": 1e3 * (ready - start), "compile_ms": 1e3 * (compiled - ready), "mask_us": times}


def xgrammar_run(hf, vocab: int, ids: list[int]) -> dict:
    import xgrammar

    start = time.perf_counter()
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
    ready = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compiled = time.perf_counter()
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    times = []
    for token in ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t)
        assert allowed(mask[0], token) and matcher.accept_token(token)
    assert matcher.is_completed() or matcher.accept_token(hf.eos_token_id)
    return {"setup_ms": 1e3 * (ready - start), "compile_ms": 1e3 * (compiled - ready), "mask_us": times}


def outlines_core_run(hf, vocab: int, ids: list[int]) -> dict:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import allocate_token_bitmask

    start = time.perf_counter()
    decoder, tokens = byte_decoder(), {}
    for text, i in hf.get_vocab().items():
        if i != hf.eos_token_id:
            key = bytes(decoder[c] for c in text) if all(c in decoder for c in text) else text.encode()
            tokens.setdefault(key, []).append(i)
    vocabulary = outlines_core.Vocabulary(hf.eos_token_id, tokens)
    ready = time.perf_counter()
    guide = outlines_core.Guide(outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary))
    compiled = time.perf_counter()
    mask = allocate_token_bitmask(vocab)
    times = []
    for token in ids:
        t = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - t)
        assert allowed(mask.view(-1), token)
        guide.advance(token)
    assert guide.is_finished() or hf.eos_token_id in guide.get_tokens()
    return {"setup_ms": 1e3 * (ready - start), "compile_ms": 1e3 * (compiled - ready), "mask_us": times}


def allowed(mask: torch.Tensor, token: int) -> bool:
    """Whether `token`'s bit is set in an int32 bitmask row (the layout all three engines write)."""
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


ENGINES = {"llguidance": llguidance_run, "xgrammar": xgrammar_run, "outlines-core": outlines_core_run}
PACKAGES = {"llguidance": ["llguidance"], "xgrammar": ["xgrammar", "triton", "tvm_ffi"],
            "outlines-core": ["outlines_core"]}


def installed_mb(names: list[str]) -> float:
    import importlib.util

    total = 0
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            total += sum(f.stat().st_size for d in spec.submodule_search_locations for f in Path(d).rglob("*")
                         if f.is_file())
    return total / 1e6


def tokenizers(out: Path) -> dict[int, Path]:
    """lmforge tokenizers of 6400 and 32000 tokens, trained on Shakespeare (and Python source, for 32000)."""
    import lmforge
    from lmforge.data.formats import builtin_shakespeare
    from lmforge.tokenizer import train_tokenizer

    code = out / "code.txt"
    code.write_text("\n".join(p.read_text(encoding="utf-8") for p in Path(lmforge.__file__).parent.rglob("*.py")),
                    encoding="utf-8")
    made = {}
    for vocab, files in ((6400, [str(builtin_shakespeare()[0])]), (32000, [str(builtin_shakespeare()[0]), str(code)])):
        train_tokenizer(files, vocab_size=vocab, out_dir=out / str(vocab), show_progress=False)
        made[vocab] = out / str(vocab)
    return made


def main() -> None:
    from transformers import PreTrainedTokenizerFast

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab, path in tokenizers(Path(tmp)).items():
            hf = PreTrainedTokenizerFast.from_pretrained(path)
            ids = hf.encode(json.dumps(DOCUMENT), add_special_tokens=False)
            for name, run in ENGINES.items():
                rounds = [run(hf, len(hf), ids) for _ in range(args.rounds)]
                masks = [t for r in rounds for t in r["mask_us"]]
                row = {"setup_ms": min(r["setup_ms"] for r in rounds),
                       "compile_ms": statistics.median(r["compile_ms"] for r in rounds),
                       "mask_us_median": 1e6 * statistics.median(masks),
                       "mask_us_p99": 1e6 * sorted(masks)[int(0.99 * (len(masks) - 1))], "tokens": len(ids)}
                row["request_ms"] = row["compile_ms"] + 1e3 * statistics.median(sum(r["mask_us"]) for r in rounds)
                results[f"{name} @ {vocab}"] = row
                print(f"{name:14s} vocab {vocab:6d}: tokenizer {row['setup_ms']:8.1f} ms, compile "
                      f"{row['compile_ms']:7.2f} ms, mask median {row['mask_us_median']:7.1f} us, "
                      f"p99 {row['mask_us_p99']:7.1f} us over {len(ids)} tokens; a request {row['request_ms']:7.2f} ms")
    sizes = {name: round(installed_mb(p), 1) for name, p in PACKAGES.items()}
    print("installed MB (with what each pulls in):", sizes)
    mine = results["llguidance @ 32000"]["request_ms"]
    others = min(results[f"{n} @ 32000"]["request_ms"] for n in ENGINES if n != "llguidance")
    print(json.dumps({"results": results, "installed_mb": sizes, "ratio": round(others / mine, 3)}))


if __name__ == "__main__":
    main()
