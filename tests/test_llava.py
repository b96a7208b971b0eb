"""The LLaVA model against transformers' LlavaForConditionalGeneration, both ways (as test_hf_parity.py for
the text families): a tiny random llava built with transformers loads in lmforge with the same logits, and
what lmforge saves (weights, config, tokenizer with `<image>`, processor configs) loads in transformers and
AutoProcessor with the same logits and the same inputs."""

import json

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from test_hf_parity import randomize  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

from lmforge.checkpoint import CheckpointError  # noqa: E402
from lmforge.model.llava import (  # noqa: E402
    LLAVA_PRESETS,
    Llava,
    build_llava,
    expand_image_tokens,
    llava_from_hf,
    llava_preset,
    llava_to_hf,
)
from lmforge.model.transformer import num_parameters  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402
from lmforge.vision.checkpoint import add_image_token, load_llava, save_llava  # noqa: E402
from lmforge.vision.image import ImageProcessorConfig, preprocess  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, vision_use_head=False)
TEXT = dict(vocab_size=120, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
IMAGE_ID = 119

CASES = {  # text family and options, LlavaConfig's own fields
    "llama-last-layer": ("llama", dict(tie_word_embeddings=False), dict(vision_feature_layer=-1)),
    "qwen2-tied-penultimate": ("qwen2", dict(tie_word_embeddings=True), dict(vision_feature_layer=-2)),
    "llama-layers-concat-default": ("llama", dict(attention_bias=True), dict(
        vision_feature_layer=[0, -1], vision_feature_select_strategy="default", multimodal_projector_bias=False)),
}


def hf_config(case, vision_use_head=False):
    family, text, llava = CASES[case]
    llava = {"vision_feature_select_strategy": "full", **llava}
    vision = SiglipVisionConfig(**{**VISION, "vision_use_head": vision_use_head})
    return LlavaConfig(vision_config=vision, text_config=AutoConfig.for_model(family, **{**TEXT, **text}),
                       image_token_index=IMAGE_ID, **llava)


def inputs(cfg, seed=0, images=2):
    """Token ids with `images` placeholder runs (one per row) and random pixels."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.image_seq_length
    rows = [[int(t) for t in torch.randint(0, IMAGE_ID, (3,), generator=g)] + [IMAGE_ID] * n
            + [int(t) for t in torch.randint(0, IMAGE_ID, (4,), generator=g)] for _ in range(images)]
    pixels = torch.rand(images, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    return torch.tensor(rows), pixels


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_lmforge(case, tmp_path):
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(hf_config(case, vision_use_head=case.startswith("llama-last"))).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = load_llava(tmp_path).eval()
    ids, pixels = inputs(ours.config)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_lmforge_to_transformers(case, tmp_path):
    cfg = llava_from_hf(hf_config(case).to_dict())
    ours = build_llava(cfg).eval()
    randomize(ours, seed=3)
    save_llava(ours, tmp_path)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, pixels = inputs(cfg, seed=1)
    with torch.no_grad():
        expected = ours(ids, pixels).logits
        got = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    assert llava_from_hf(hf.config.to_dict()) == cfg


def test_hub_spellings_load(tmp_path):
    """Checkpoints written with transformers' in-memory names (`model.language_model.*`, `lm_head.weight`,
    `model.vision_tower.*`) load too, to the same model."""
    cfg = llava_from_hf(hf_config("llama-last-layer").to_dict())
    ours = build_llava(cfg).eval()
    randomize(ours, seed=5)
    save_llava(ours, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / "model.safetensors")
    renames = [("language_model.lm_head", "lm_head"), ("language_model.model.", "model.language_model."),
               ("vision_tower.vision_model.", "model.vision_tower."), ("multi_modal", "model.multi_modal")]
    renamed = {}
    for name, t in tensors.items():
        for old, new in renames:
            name = name.replace(old, new)
        renamed[name] = t
    save_file(renamed, tmp_path / "a" / "model.safetensors")
    loaded = load_llava(tmp_path / "a")
    ids, pixels = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixels).logits, ours(ids, pixels).logits)


@pytest.fixture(scope="module")
def image_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("What colour is the circle? The circle is red. How many squares are there? Two.\n" * 50)
    train_tokenizer([str(corpus)], vocab_size=300, out_dir=root / "base", show_progress=False)
    image_id = add_image_token(root / "base", root / "with_image")
    return root / "with_image", image_id


def test_processor_and_model_load_in_transformers(image_tokenizer, tmp_path):
    """AutoProcessor on what save_llava wrote: the same token ids (`<image>` expanded) and pixel values as
    lmforge's, and LlavaForConditionalGeneration's logits on them equal lmforge's."""
    tok_dir, image_id = image_tokenizer
    cfg = llava_preset("tiny-llava", image_token_index=image_id, vocab_size=image_id + 1)
    cfg.vision.num_hidden_layers = 1  # faster; the layout is what is tested
    cfg.text.num_hidden_layers = 1
    model = build_llava(cfg, seed=0).eval()
    randomize(model, seed=7)
    save_llava(model, tmp_path, tokenizer_dir=tok_dir)
    processor = AutoProcessor.from_pretrained(tmp_path, backend="pil")
    image = Image.new("RGB", (50, 30), (20, 200, 90))
    text = "<image>\nWhat colour is the circle?"
    batch = processor(images=[image], text=[text], return_tensors="pt")
    from lmforge.tokenizer import Tokenizer

    ours_ids = expand_image_tokens(Tokenizer.from_dir(tok_dir).encode(text), cfg)
    assert batch["input_ids"][0].tolist() == ours_ids
    pixels = preprocess([image], ImageProcessorConfig(size=cfg.vision.image_size))
    torch.testing.assert_close(batch["pixel_values"], pixels, atol=1e-5, rtol=0)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ours_ids]), pixels).logits
        got = hf(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_presets_build():
    for name in LLAVA_PRESETS:
        cfg = llava_preset(name, image_token_index=6400, vocab_size=6401)
        with torch.device("meta"):
            model = Llava(cfg)
        assert llava_from_hf(llava_to_hf(cfg)) == cfg
        assert cfg.image_seq_length == 64
        vision = num_parameters(model.vision_tower)
        assert (vision < 1e6) if name == "tiny-llava" else (vision < 1e7)


def test_errors(tmp_path):
    cfg = llava_from_hf(hf_config("llama-last-layer").to_dict())
    model = build_llava(cfg).eval()
    ids, pixels = inputs(cfg)
    with pytest.raises(ValueError, match="placeholder tokens for 1 images"):
        model(ids, pixels[:1])
    with pytest.raises(ValueError, match="but no image"):
        model(ids)
    d = llava_to_hf(cfg)
    with pytest.raises(ValueError, match="vision_config.model_type"):
        llava_from_hf({**d, "vision_config": {**d["vision_config"], "model_type": "clip_vision_model"}})
    with pytest.raises(ValueError, match="vision_feature_layer"):
        llava_from_hf({**d, "vision_feature_layer": 9})
    save_llava(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="5 layers in config.json, 3 in the weights"):
        load_llava(tmp_path)


def test_cache_sharding_and_gradients(tmp_path):
    """A prefill with the image into the KV cache, then a step without it, gives the full forward's logits; a
    sharded bf16 save loads in transformers; every parameter (tower, projector, language model) gets a gradient."""
    cfg = llava_from_hf(hf_config("llama-last-layer").to_dict())
    model = build_llava(cfg).eval()
    randomize(model, seed=9)
    ids, pixels = inputs(cfg, images=1)
    with torch.no_grad():
        full = model(ids, pixels).logits
        cache = model.language_model.new_cache(1, ids.shape[1])
        T = ids.shape[1] - 1
        prefill = model(ids[:, :T], pixels, position_ids=torch.arange(T)[None], cache=cache).logits
        step = model(ids[:, T:], position_ids=torch.tensor([[T]]), cache=cache).logits
    torch.testing.assert_close(torch.cat([prefill, step], 1), full, atol=1e-5, rtol=1e-5)

    save_llava(model, tmp_path, dtype=torch.bfloat16, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = load_llava(tmp_path)(ids, pixels).logits
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, expected, atol=1e-4, rtol=1e-4)

    model.train()
    logits = model(ids, pixels).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert no_grad == [n for n in no_grad if "post_layernorm" in n]  # LLaVA reads the layers before it
