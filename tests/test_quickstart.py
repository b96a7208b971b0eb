"""The main job end to end, shortened: every stage runs and hands a real artefact to the next."""

import json

from lmforge.checkpoint import load_model
from lmforge.quickstart import main


def test_quickstart_smoke(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["--out-dir", str(out), "--steps", "4", "--vocab-size", "400", "--batch-size", "2",
                 "--seq-len", "64", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "logits identical" in printed and "bits per byte" in printed
    model_dir = out / "pretrain" / "checkpoint-000004"
    assert f"lmforge chat --model {model_dir}" in printed and f"lmforge serve --model {model_dir}" in printed
    assert (out / "pretrain" / "loss.png").stat().st_size > 0
    assert f"loss curve: {out / 'pretrain' / 'loss.png'}" in printed
    sample = printed.split("    sample:\n", 1)[1].split("\n\n", 1)[0]  # the prompt, then generated text
    assert sample.startswith("      ROMEO:") and len(sample.strip()) > len("ROMEO:")
    model = load_model(model_dir)
    assert model.config.vocab_size == 400
    assert json.loads((out / "data" / "manifest.json").read_text())["vocab_size"] == 400
    assert (model_dir / "tokenizer.json").is_file()
