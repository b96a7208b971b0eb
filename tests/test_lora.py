"""LoRA, rsLoRA and DoRA against PEFT on the transformers model: adapters both ways, logits,
gradients, merge, the `lmforge merge` command, and which parameters train."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lmforge.checkpoint import load_model, save_model
from lmforge.cli import main as cli_main
from lmforge.config import ModelConfig, preset
from lmforge.model import build_model
from lmforge.model.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    target_module_names,
)

# Untied (so lm_head exists and all-linear must skip it), with biases (DoRA subtracts them).
CFG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True, o_proj_bias=True,
                  mlp_bias=True, tie_word_embeddings=False, max_position_embeddings=64)
VARIANTS = {
    "lora": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": LoraConfig(r=4, alpha=8, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True),
    "dora": LoraConfig(r=4, alpha=8, target_modules=["all-linear"], use_dora=True),
}


def peft_config(s: LoraConfig, **kw) -> PeftLoraConfig:
    targets = "all-linear" if s.target_modules == ["all-linear"] else s.target_modules
    return PeftLoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets,
                      use_rslora=s.use_rslora, use_dora=s.use_dora, task_type="CAUSAL_LM", **kw)


@torch.no_grad()
def randomize(named_params, seed):
    """Non-zero values for every adapter tensor (B starts at 0, which would hide a mis-wired B)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif "lora_" in name:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    model = build_model(CFG, seed=0)
    with torch.no_grad():  # norms away from 1 and non-zero biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(4.0)
    save_model(model, path)
    (path / "tokenizer.json").write_text("{}")  # so merge has a tokenizer file to copy
    return path


def hf_model(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")


def tokens(seed=0):
    return torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))


def adapted(base_dir, settings, seed=1):
    model = apply_lora(load_model(base_dir), settings)
    randomize(model.named_parameters(), seed)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_adapter_loads_in_peft(variant, base_dir, tmp_path):
    settings = VARIANTS[variant]
    ours = adapted(base_dir, settings)
    save_adapter(ours, tmp_path / "adapter", base_model_path=str(base_dir))
    theirs = PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter", is_trainable=True)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x).logits, ours.eval()(x).logits, atol=1e-4, rtol=1e-4)

    # The file holds exactly the tensors PEFT itself would save for this model.
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(get_peft_model_state_dict(theirs))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["use_dora"]) == ("LORA", 4, settings.use_dora)

    # Same gradients, so training matches too (DoRA's detached norm included). Dropout is on: both
    # draw their masks in the same order from the same seed.
    theirs.train()
    ours.train()
    for m in lora_modules(ours).values():
        m.dropout = torch.nn.Dropout(0.2)
    for m in theirs.modules():
        if hasattr(m, "lora_dropout") and "default" in m.lora_dropout:
            m.lora_dropout["default"] = torch.nn.Dropout(0.2)
    for model in (ours, theirs):
        torch.manual_seed(5)
        model(x).logits.square().mean().backward()
    their_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    our_grads = {n if "magnitude" not in n else n + ".weight": g for n, g in our_grads.items()}
    our_grads = {n.replace("lora_A", "lora_A.weight").replace("lora_B", "lora_B.weight"): g
                 for n, g in our_grads.items()}
    assert set(our_grads) == set(their_grads)
    for name, g in our_grads.items():
        torch.testing.assert_close(g, their_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_lmforge(variant, base_dir, tmp_path):
    settings = VARIANTS[variant]
    torch.manual_seed(0)
    theirs = get_peft_model(hf_model(base_dir), peft_config(settings, init_lora_weights="gaussian"))
    randomize(theirs.named_parameters(), seed=2)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_model(base_dir), tmp_path / "adapter")
    x = tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x).logits, theirs.eval()(x).logits, atol=1e-4, rtol=1e-4)
    assert ours.lora_settings.use_dora == settings.use_dora
    assert ours.lora_settings.init == "gaussian"
    # Resuming: loading into a model that already has the same adapters overwrites them.
    again = apply_lora(load_model(base_dir), settings)
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).logits, ours(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_equals_peft_merge_and_cli(variant, base_dir, tmp_path):
    settings = VARIANTS[variant]
    ours = adapted(base_dir, settings, seed=3)
    save_adapter(ours, tmp_path / "adapter")
    x = tokens(2)
    with torch.no_grad():
        before = ours.eval()(x).logits
        merge_lora(ours)
        after = ours(x).logits
    assert not lora_modules(ours) and not any("lora" in n for n in ours.state_dict())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)

    theirs = PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").merge_and_unload()
    their_weights = theirs.state_dict()
    for name, w in ours.state_dict().items():
        torch.testing.assert_close(w, their_weights[name], atol=1e-5, rtol=1e-5, msg=name)

    assert cli_main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = hf_model(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, before, atol=1e-4, rtol=1e-4)


def test_merge_cli_bfloat16(base_dir, tmp_path):
    save_adapter(adapted(base_dir, VARIANTS["dora"]), tmp_path / "adapter")
    assert cli_main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path / "merged", dtype=torch.bfloat16) is not None


def test_only_adapters_train_and_all_linear_matches_peft(base_dir):
    ours = apply_lora(load_model(base_dir), VARIANTS["dora"])
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B", "lora_magnitude_vector") for n in trainable)
    assert len(trainable) == 3 * len(lora_modules(ours))
    # HF names of the base weights are unchanged.
    assert {n for n in ours.state_dict() if "lora_" not in n} == set(load_model(base_dir).state_dict())

    theirs = get_peft_model(hf_model(base_dir), peft_config(VARIANTS["dora"]))
    their_targets = {n.removeprefix("base_model.model.") for n in theirs.targeted_module_names}
    assert set(lora_modules(ours)) == their_targets
    assert "lm_head" not in their_targets and len(their_targets) == 7 * CFG.num_hidden_layers


def test_rslora_scaling_and_zero_init_is_identity(base_dir):
    model = load_model(base_dir).eval()
    x = tokens(3)
    with torch.no_grad():
        expected = model(x).logits
        for s in (VARIANTS["rslora"], VARIANTS["dora"]):
            fresh = apply_lora(load_model(base_dir), s).eval()
            torch.testing.assert_close(fresh(x).logits, expected, atol=1e-5, rtol=1e-5)
    m = next(iter(lora_modules(apply_lora(load_model(base_dir), VARIANTS["rslora"])).values()))
    assert m.scaling == pytest.approx(8 / 4**0.5)


@pytest.mark.parametrize("name, targets, use_dora, expect", [
    ("tiny-moe", ["all-linear"], False, ["mlp.experts.0.gate_proj", "self_attn.q_proj"]),
    ("tiny-mla", ["kv_a_proj_with_mqa", "kv_b_proj", "q_proj", "down_proj"], True,
     ["self_attn.kv_b_proj", "mlp.experts.3.down_proj", "mlp.shared_experts.down_proj"]),
])
def test_moe_and_mla_one_step_changes_only_adapters(name, targets, use_dora, expect, tmp_path):
    cfg = preset(name, vocab_size=128, num_hidden_layers=2)
    model = apply_lora(build_model(cfg, seed=0), LoraConfig(r=2, alpha=4, target_modules=targets,
                                                              use_dora=use_dora))
    wrapped = set(lora_modules(model))
    for suffix in expect:
        assert any(n.endswith(suffix) for n in wrapped), suffix
    randomize([(n, p) for n, p in model.named_parameters() if "lora_B" in n], seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(x)
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        is_adapter = "lora_" in n
        # Experts no token was routed to get no gradient; every other adapter moves.
        if is_adapter and p.grad is not None:
            assert changed, n
        assert changed <= is_adapter, n
    save_adapter(model, tmp_path / "a")
    reloaded = load_adapter(build_model(cfg, seed=0), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x).logits, model.eval()(x).logits, atol=0, rtol=0)


def test_mixtral_adapter_uses_checkpoint_names(tmp_path):
    cfg = ModelConfig(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=32,
                      moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=2, num_experts_per_tok=1, norm_topk_prob=True)
    model = apply_lora(build_model(cfg), LoraConfig(r=2, target_modules=["gate_proj"]))
    randomize(model.named_parameters(), seed=5)
    save_adapter(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.block_sparse_moe.experts.1.w1.lora_B.weight" in f.keys()
    reloaded = load_adapter(build_model(cfg), tmp_path / "a")
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_errors_name_the_problem(base_dir, tmp_path):
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(load_model(base_dir), LoraConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="r: must be positive"):
        LoraConfig(r=0)
    settings = LoraConfig()
    settings.dropout = 1.5  # as a YAML/flag loader sets fields after construction
    with pytest.raises(ValueError, match="dropout: must be in"):
        apply_lora(load_model(base_dir), settings)
    model = apply_lora(load_model(base_dir), VARIANTS["lora"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, VARIANTS["lora"])
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        load_adapter(load_model(base_dir), tmp_path / "a")
    with pytest.raises(ValueError, match="use_dora=False, unlike"):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
        load_adapter(apply_lora(load_model(base_dir), LoraConfig(r=4, alpha=8, use_dora=True,
                                                                  target_modules=["q_proj", "v_proj",
                                                                                  "down_proj"])),
                     tmp_path / "a")
    assert isinstance(lora_modules(model)["model.layers.0.self_attn.q_proj"], LoraLinear)
    assert target_module_names(model, "model\\.layers\\.1\\.self_attn\\.(q|v)_proj") == []  # wrapped now


def test_init_choices_match_peft(base_dir):
    """A ~ kaiming-uniform (bound 1/sqrt(in)) or N(0, 1/r), B = 0: PEFT's init_lora_weights True / "gaussian"."""
    torch.manual_seed(0)
    for init in ("kaiming", "gaussian"):
        model = apply_lora(load_model(base_dir), LoraConfig(r=4, target_modules=["all-linear"], init=init))
        a = torch.cat([m.lora_A.flatten() for m in lora_modules(model).values()])
        assert all(not m.lora_B.any() for m in lora_modules(model).values())
        if init == "kaiming":
            for m in lora_modules(model).values():
                bound = m.in_features**-0.5
                assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound
        else:
            assert abs(a.std().item() - 1 / 4) < 0.01
    assert LoraConfig(init="gaussian").init == "gaussian"
