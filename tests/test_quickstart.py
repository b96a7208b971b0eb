"""The main job end to end in its smoke mode: every stage runs and hands a real artefact to the next, the final
directory loads in transformers with lmforge's greedy continuation, the report has every stage, and a second
run reuses every finished stage."""

import contextlib
import io
import json

import pytest
import torch

from lmforge.quickstart import main

STAGES = ["init", "base", "sft", "dpo", "rl"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        assert main(["--out-dir", str(out), "--smoke", "true", "--eval-items", "8"]) == 0
    # not a terminal: plain lines, no progress bar redrawn with carriage returns
    assert "\r" not in printed.getvalue() + errors.getvalue()
    assert "step 30/30" in errors.getvalue()  # the trainer's plain progress line
    return out


def test_every_stage_reported(smoke):
    report = json.loads((smoke / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["data", "base", "sft", "dpo", "rl", "eval"]
    assert list(report["evals"]) == [*STAGES, "q8_0.gguf"]
    for stage in [*STAGES, "q8_0.gguf"]:
        assert set(report["evals"][stage]) == {"shakespeare-bpb", "shakespeare-cloze", "arithmetic"}
    evals = report["evals"]
    assert evals["base"]["shakespeare-bpb"]["bits_per_byte"] < evals["init"]["shakespeare-bpb"]["bits_per_byte"]
    by_name = {s["name"]: s for s in report["stages"]}
    assert by_name["base"]["metrics"]["held-out bits per byte"] == [
        evals["init"]["shakespeare-bpb"]["bits_per_byte"], evals["base"]["shakespeare-bpb"]["bits_per_byte"]]
    assert by_name["dpo"]["steps"] == 4 and by_name["rl"]["steps"] == 3
    assert report["environment"]["torch"] == torch.__version__
    markdown = (smoke / "report.md").read_text()
    assert "| task | metric | init | base | sft | dpo | rl | q8_0.gguf |" in markdown
    # the exported file scores as the model it came from, within what 8 bits change
    bpb = [evals[s]["shakespeare-bpb"]["bits_per_byte"] for s in ("rl", "q8_0.gguf")]
    assert bpb[1] == pytest.approx(bpb[0], rel=1e-3)
    for png in ("pretrain/loss.png", "sft/loss.png", "rl/reward.png"):
        assert f"]({png})" in markdown and (smoke / png).stat().st_size > 0
    assert "ROMEO:" in markdown and "user: " in markdown  # a sample and a chat transcript


def test_final_model_loads_in_transformers_with_the_same_greedy_tokens(smoke):
    from transformers import AutoModelForCausalLM

    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams

    model_dir = smoke / "model"
    llm = LLM.load(model_dir)
    prompt = llm.encode("ROMEO:\n")
    ours = llm.engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0][0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ours.token_ids == ids[0, len(prompt):].tolist()


def test_gguf_export_loads_in_llama_cpp(smoke):
    import llama_cpp

    from lmforge.tokenizer import Tokenizer

    gguf = smoke / "gguf" / "model-q8_0.gguf"
    assert "FROM " in (gguf.parent / "Modelfile").read_text()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, verbose=False)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    assert llm.tokenize(text.encode(), add_bos=False) == Tokenizer.from_dir(smoke / "model").encode(text)


def test_second_run_reuses_every_stage(smoke, capsys):
    before = (smoke / "report.json").read_text()
    assert main(["--out-dir", str(smoke), "--smoke", "true", "--eval-items", "8"]) == 0
    printed = capsys.readouterr().out
    for stage in ("data", "base", "sft", "dpo", "rl"):
        assert f"[{stage}] done by an earlier run" in printed
    assert "$ lmforge" not in printed  # no command ran again
    assert json.loads((smoke / "report.json").read_text())["evals"] == json.loads(before)["evals"]
