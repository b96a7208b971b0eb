"""Checkpoints: sharding, dtypes, atomic saves and clear errors."""

import json

import pytest
import safetensors.torch
import torch

from lmforge import checkpoint
from lmforge.checkpoint import CheckpointError, load_model, save_model
from lmforge.config import ModelConfig, ModelConfigError, load_config, preset
from lmforge.model import build_model

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64)


def logits(model, seed=0):
    x = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


def test_round_trip_and_files(tmp_path):
    model = build_model(CFG, seed=0)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    (tok_dir / "tokenizer_config.json").write_text("{}")
    save_model(model, tmp_path / "m", tokenizer_dir=tok_dir)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert names == {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_theta"] == CFG.rope_theta
    assert torch.equal(logits(load_model(tmp_path / "m")), logits(model))
    assert load_config(tmp_path / "m") == CFG


def test_sharded_save_loads_in_lmforge_and_transformers(tmp_path):
    model = build_model(CFG, seed=1)
    save_model(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    torch.testing.assert_close(logits(load_model(tmp_path)), logits(model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    x = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, logits(model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_half_precision_weights(tmp_path, dtype):
    model = build_model(CFG, seed=2)
    save_model(model, tmp_path, dtype=dtype)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    loaded = load_model(tmp_path)  # fp32 in memory by default
    rounded = {k: v.to(dtype).float() for k, v in model.state_dict().items()}
    for name, p in loaded.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, rounded[name]), name
    assert load_model(tmp_path, dtype=torch.bfloat16).model.norm.weight.dtype == torch.bfloat16


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = build_model(CFG, seed=3)
    save_model(old, tmp_path / "ckpt")
    expected = logits(old)
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second shard: the first is already on disk
            raise OSError("disk full (simulated)")
        safetensors.torch.save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_model(build_model(CFG, seed=4), tmp_path / "ckpt", max_shard_bytes=20_000)
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind
    assert torch.equal(logits(load_model(tmp_path / "ckpt")), expected)


def test_crash_between_renames_recovers_previous(tmp_path):
    model = build_model(CFG, seed=5)
    save_model(model, tmp_path / "ckpt")
    # The moment after the old checkpoint was moved aside and before the new one took its place.
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")
    torch.testing.assert_close(logits(load_model(tmp_path / "ckpt")), logits(model))


def test_unsupported_model_type_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ModelConfigError, match=r"config\.json: model_type: 'gpt2' is not supported"):
        load_model(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope_scaling.rope_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("use_sliding_window", True, "use_sliding_window"),
])
def test_unsupported_options_name_the_field(tmp_path, field, value, match):
    save_model(build_model(CFG), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    if field == "rope_parameters":
        config.pop("rope_scaling")
    if field == "use_sliding_window":
        config["model_type"] = "qwen2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=match):
        load_model(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    model = build_model(CFG)
    save_model(model, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(3, 3\)"):
        load_model(tmp_path)


def test_moe_presets_round_trip(tmp_path):
    for name in ("tiny-moe", "tiny-mla"):
        model = build_model(preset(name, vocab_size=64, num_hidden_layers=2), seed=0)
        save_model(model, tmp_path / name)
        torch.testing.assert_close(logits(load_model(tmp_path / name)), logits(model))


@pytest.mark.parametrize("change, match", [
    ({"hidden_size": 1e9}, r"config\.json: hidden_size: 1000000000\.0 is not an integer >= 1"),
    ({"hidden_size": "32"}, r"config\.json: hidden_size: '32' is not an integer >= 1"),
    ({"num_hidden_layers": 0}, r"config\.json: num_hidden_layers: 0 is not an integer >= 1"),
    ({"num_hidden_layers": -3}, r"config\.json: num_hidden_layers: -3 is not an integer >= 1"),
    ({"rms_norm_eps": "tiny"}, r"config\.json: rms_norm_eps: 'tiny' is not a positive number"),
    ({"rope_theta": -1.0, "rope_parameters": None}, r"config\.json: rope_theta: -1\.0 is not a positive number"),
    ({"eos_token_id": [1, "2"]}, r"config\.json: eos_token_id: \[1, '2'\] is not a token id"),
    ({"num_attention_heads": None}, r"config\.json: num_attention_heads: None is not an integer"),
    ({"head_dim": 7}, r"config\.json: head_dim: 7: RoPE rotates pairs"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None},
     r"config\.json: rope_scaling\.low_freq_factor: missing"),
    ({"max_position_embeddings": [64]}, r"config\.json: max_position_embeddings: \[64\] is not an integer"),
])
def test_config_json_fields_of_the_wrong_type_or_range_are_named(tmp_path, change, match):
    save_model(build_model(CFG), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelConfigError, match=match):
        load_model(tmp_path)


@pytest.mark.parametrize("change, match", [
    # sizes the weights cannot have are refused from the headers, before anything is allocated
    ({"hidden_size": 10**9, "head_dim": 8}, r"hidden_size 1000000000 exceeds every dimension of the weights "
                                            r"\(the largest is 101\)"),
    ({"intermediate_size": 10**12}, r"intermediate_size 1000000000000 exceeds every dimension"),
    ({"vocab_size": 2**40}, r"vocab_size 1099511627776 exceeds"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers 3, but the weights hold 2 layers"),
    ({"num_hidden_layers": 10**9}, r"num_hidden_layers 1000000000, but the weights hold 2 layers"),
    ({"num_key_value_heads": 1}, r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 32\), "
                                 r"config\.json implies \(8, 32\)"),
])
def test_config_json_that_does_not_describe_the_weights_is_named(tmp_path, change, match):
    save_model(build_model(CFG), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=r"config\.json: " + match if "has shape" not in match else match):
        load_model(tmp_path)


def test_truncated_or_garbage_weights_and_bad_json_are_named(tmp_path):
    save_model(build_model(CFG), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(tmp_path)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelConfigError, match=r"config\.json: expected a JSON object"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 1')
    with pytest.raises(ModelConfigError, match=r"config\.json: not valid JSON"):
        load_model(tmp_path)
