"""`lmforge vlm` (train/vlm.py) and its data (data/vlm.py): image chats in both formats become the same samples,
with image placeholders expanded and labels on the assistant's reply only; align trains the projector alone;
SFT lowers the loss; a resumed run equals an uninterrupted one; checkpoints load in transformers with the same
logits (a LoRA run's merged); two torchrun processes (DDP, FSDP) train as one with the same global batch; activation
checkpointing reaches the language model's blocks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.data.formats import DataError
from lmforge.data.sft import IGNORE_INDEX
from lmforge.data.shapes import write_shapes
from lmforge.data.vlm import ImageChatDataset, collate_images
from lmforge.model import build_model
from lmforge.model.llava import LlavaConfig, build_llava
from lmforge.model.vision import VisionConfig
from lmforge.settings import parse_args_or_raise
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train import vlm
from lmforge.train.vlm import VLMConfig
from lmforge.vision.checkpoint import IMAGE_TOKEN, add_image_token, load_llava, save_llava

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shapes data (16 px), a tokenizer with <image> trained on its text, and a small random llava directory
    (4 image tokens per image)."""
    root = tmp_path_factory.mktemp("vlm")
    files = write_shapes(root / "shapes", train=16, test=4, image_size=16)
    corpus = root / "corpus.txt"
    corpus.write_text("".join(files[name].read_text() for name in ("llava_train", "llava_captions")))
    train_tokenizer([str(corpus)], vocab_size=400, out_dir=root / "plain", show_progress=False)
    image_id = add_image_token(root / "plain", root / "tokenizer")
    tokenizer = Tokenizer.from_dir(root / "tokenizer")
    text = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4)
    model = build_llava(LlavaConfig(text=text, vision=vision, image_token_index=image_id), seed=0)
    save_llava(model, root / "llava", tokenizer_dir=root / "tokenizer")
    return {"root": root, "files": files, "tokenizer": tokenizer, "model": root / "llava", "config": model.config}


def dataset(world, name, **kwargs):
    cfg = world["config"]
    return ImageChatDataset(str(world["files"][name]), world["tokenizer"], cfg.image_token_index, cfg.image_seq_length,
                            cfg.vision.image_size, **kwargs)


def train(world, run_dir, *flags):
    argv = ["--model", str(world["model"]), "--data", str(world["files"]["llava_train"]), "--batch-size", "4",
            "--train.run-dir", str(run_dir), "--train.device", "cpu", "--train.progress", "false",
            "--train.eval-every", "0", "--train.steps", "3", *flags]
    return vlm.run(parse_args_or_raise(VLMConfig, argv))


def test_both_formats_same_samples_and_masks(world):
    cfg, tokenizer = world["config"], world["tokenizer"]
    llava, openai = list(dataset(world, "llava_train")), list(dataset(world, "openai_train"))
    assert len(llava) == len(openai) == 16
    records = [json.loads(line) for line in world["files"]["llava_train"].read_text().splitlines()]
    end_of_turn = tokenizer.token_to_id("<|im_end|>")
    for a, b, record in zip(llava, openai, records):
        assert a.input_ids == b.input_ids and a.labels == b.labels
        assert len(a.images) == len(b.images) == 1 and (a.images[0] == b.images[0]).all()
        image_positions = [i for i, t in enumerate(a.input_ids) if t == cfg.image_token_index]
        assert len(image_positions) == cfg.image_seq_length == 4  # one placeholder, expanded
        assert image_positions == list(range(image_positions[0], image_positions[0] + 4))  # one run
        assert all(a.labels[i] == IGNORE_INDEX for i in image_positions)
        # Labelled: exactly the reply and its end of turn; everything before it (system, user, image) is not.
        labelled = [t for t in a.labels if t != IGNORE_INDEX]
        assert labelled[-1] == end_of_turn or labelled[-2] == end_of_turn
        assert tokenizer.decode(labelled, skip_special_tokens=True).strip() == record["answer"]
        first = next(i for i, t in enumerate(a.labels) if t != IGNORE_INDEX)
        assert first > image_positions[-1]
    batch = collate_images(llava[:3], tokenizer.pad_id, cfg.vision.image_size)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["input_ids"].shape == batch["labels"].shape


def test_bad_records_name_file_and_line(world, tmp_path):
    good = json.loads(world["files"]["llava_train"].read_text().splitlines()[0])
    good["image"] = str(world["files"]["llava_train"].parent / good["image"])
    rows = [good, {**good, "image": [good["image"], good["image"]]}, {**good, "image": "missing.png"},
            {"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]},
                          {"role": "assistant", "content": "red"}]}]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + "\nnot json\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: 1 <image> placeholders for 2 images"):
        list(ImageChatDataset(str(path), world["tokenizer"], *_ids(world)))
    data = ImageChatDataset(str(path), world["tokenizer"], *_ids(world), skip_bad=True)
    assert len(list(data)) == 1 and data.stats.skipped == 4
    problems = "\n".join(data.stats.problems)
    assert "line 3: image:" in problems and "missing.png" in problems
    assert "line 4: messages[0]: a content part" in problems and "line 5: malformed JSON" in problems


def _ids(world):
    cfg = world["config"]
    return cfg.image_token_index, cfg.image_seq_length, cfg.vision.image_size


def test_align_trains_only_the_projector(world, tmp_path):
    result = train(world, tmp_path / "align", "--stage", "align")
    before, after = load_llava(world["model"]).state_dict(), load_llava(result.model_dir).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {n for n in before if n.startswith("multi_modal_projector.")}


def test_sft_lowers_the_loss_and_trains_what_it_says(world, tmp_path):
    result = train(world, tmp_path / "sft", "--stage", "sft", "--train.steps", "30", "--train.optim.lr", "1e-2",
                   "--train.optim.warmup-steps", "0")
    losses = [row["loss"] for row in result.history]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    before, after = load_llava(world["model"]).state_dict(), load_llava(result.model_dir).state_dict()
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"multi_modal_projector", "language_model"}  # the tower is frozen by default
    tower = train(world, tmp_path / "tower", "--stage", "sft", "--method", "freeze", "--freeze.layers", "-1",
                  "--train-vision-tower", "true", "--train.steps", "1")
    after = load_llava(tower.model_dir).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(n.startswith("vision_tower.") for n in changed)
    assert not any(n.startswith("language_model.model.layers.0.") for n in changed)


def test_resumed_run_equals_uninterrupted(world, tmp_path, monkeypatch):
    flags = ["--stage", "sft", "--train.steps", "6", "--train.save-every", "2"]
    full = train(world, tmp_path / "full", *flags)
    loss = vlm.causal_lm_loss
    calls = 0

    def interrupted(model, batch, chunk_size):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return loss(model, batch, chunk_size)

    monkeypatch.setattr(vlm, "causal_lm_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(world, tmp_path / "cut", *flags)
    monkeypatch.setattr(vlm, "causal_lm_loss", loss)
    resumed = train(world, tmp_path / "cut", *flags, "--resume", "auto")
    assert resumed.history[0]["step"] == 5
    expected, got = load_file(full.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpoint_loads_in_transformers(world, tmp_path, method):
    transformers = pytest.importorskip("transformers")
    result = train(world, tmp_path / method, "--stage", "sft", "--method", method, "--lora.r", "4",
                   "--train.optim.lr", "1e-2")
    ours = load_llava(result.model_dir).eval()
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(result.model_dir).eval()
    batch = collate_images(list(dataset(world, "llava_test")), world["tokenizer"].pad_id, 16)
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        got = ours(batch["input_ids"], batch["pixel_values"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if method == "lora":  # the adapters were trained and merged into the saved weights
        base = load_llava(world["model"]).state_dict()
        assert not torch.equal(base["language_model.model.layers.0.self_attn.q_proj.weight"],
                               ours.state_dict()["language_model.model.layers.0.self_attn.q_proj.weight"])


def test_preset_around_a_text_model(world, tmp_path):
    """tiny-llava's tower around a text model dir whose tokenizer lacks <image>: the tokenizer gains it in
    RUN_DIR/tokenizer, the vocabulary grows by one row, the text weights are kept."""
    plain = Tokenizer.from_dir(world["root"] / "plain")
    text = build_model(ModelConfig(model_type="llama", vocab_size=plain.vocab_size, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256), seed=1)
    save_model(text, tmp_path / "text", tokenizer_dir=world["root"] / "plain")
    argv = ["--model", "tiny-llava", "--text-model", str(tmp_path / "text"), "--data",
            str(world["files"]["openai_captions"]), "--batch-size", "2", "--train.run-dir", str(tmp_path / "run"),
            "--train.device", "cpu", "--train.progress", "false", "--train.steps", "1"]
    result = vlm.run(parse_args_or_raise(VLMConfig, argv))
    model = load_llava(result.model_dir)
    image_id = Tokenizer.from_dir(tmp_path / "run" / "tokenizer").token_to_id(IMAGE_TOKEN)
    assert model.config.image_token_index == image_id == plain.vocab_size
    assert model.config.text.vocab_size == plain.vocab_size + 1
    torch.testing.assert_close(model.language_model.model.embed_tokens.weight[:-1], text.model.embed_tokens.weight,
                               rtol=0, atol=0)


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_train_as_one_with_the_same_global_batch(world, tmp_path, distributed):
    """torchrun's two CPU processes (gloo), each with half the global batch of 4 (its own samples and their images),
    log one process's losses and validation loss, step by step into the second epoch, and rank 0 writes the same
    llava directory."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    flags = ["--stage", "sft", "--val-data", str(world["files"]["llava_test"]), "--train.steps", "5",
             "--train.eval-every", "5", "--train.optim.lr", "1e-2"]
    one = train(world, tmp_path / "one", *flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    argv = ["vlm", "--model", str(world["model"]), "--data", str(world["files"]["llava_train"]), "--batch-size", "2",
            "--train.run-dir", str(tmp_path / "two"), "--train.device", "cpu", "--train.progress", "false", *flags,
            "--train.distributed", distributed]
    if distributed == "fsdp":  # each language model block sharded on its own, and recomputed in backward
        argv += ["--train.activation-checkpointing", "true"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "lmforge.cli", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close([r["loss"] for r in rows if "loss" in r], [r["loss"] for r in one.history],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(next(r["val_loss"] for r in rows if "val_loss" in r), one.val_loss, rtol=1e-5,
                               atol=1e-5)
    ours, expected = load_llava(tmp_path / "two" / "final").state_dict(), load_llava(one.model_dir).state_dict()
    assert ours.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_activation_checkpointing_recomputes_the_language_model_blocks(world, tmp_path, monkeypatch):
    """The Trainer finds a llava model's blocks (its language model's) to recompute, as FSDP shards them."""
    import torch.utils.checkpoint

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    plain = train(world, tmp_path / "plain", "--stage", "sft", "--train.steps", "1")
    assert not calls
    recomputed = train(world, tmp_path / "ckpt", "--stage", "sft", "--train.steps", "1",
                       "--train.activation-checkpointing", "true")
    assert len(calls) == world["config"].text.num_hidden_layers  # one forward, each block once
    assert recomputed.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], rel=1e-6)
