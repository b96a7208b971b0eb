"""Logits parity with transformers, both ways, for every supported family and option.

HF -> lmforge: build a tiny random model with transformers, save it, load it with
lmforge.checkpoint.load_model, compare logits on random tokens.
lmforge -> HF: build the same config in lmforge, save it, load with
AutoModelForCausalLM.from_pretrained, compare.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lmforge.checkpoint import load_model, save_model  # noqa: E402
from lmforge.config import from_hf  # noqa: E402
from lmforge.model import build_model  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)
MLA = dict(kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, num_key_value_heads=4)

CASES = {
    "llama-bias-untied": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "llama-tied-mqa-llama3": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32), rope_theta=500000.0)),
    "llama-mha-linear": ("llama", dict(num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama-yarn": ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                   original_max_position_embeddings=64))),
    "mistral-window-headdim": ("mistral", dict(sliding_window=5, head_dim=24)),
    "qwen2-qkv-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qknorm-yarn": ("qwen3", dict(head_dim=24, rope_scaling=dict(
        rope_type="yarn", factor=2.0, original_max_position_embeddings=128, beta_fast=16, beta_slow=2))),
    "qwen2_moe-shared": ("qwen2_moe", dict(num_experts=4, shared_expert_intermediate_size=40, norm_topk_prob=False,
                                           mlp_only_layers=[1], **MOE)),
    "qwen3_moe-sparse-step": ("qwen3_moe", dict(num_experts=4, norm_topk_prob=True, decoder_sparse_step=2,
                                                head_dim=16, **MOE)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "deepseek_v3-qlora-groups-yarn": ("deepseek_v3", dict(
        n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=20,
        routed_scaling_factor=2.5, rope_interleave=True, **MOE, **MLA,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0,
                          mscale_all_dim=0.707, beta_fast=32, beta_slow=1))),
    "deepseek_v3-no-qlora": ("deepseek_v3", dict(
        n_routed_experts=4, n_group=1, topk_group=1, n_shared_experts=2, first_k_dense_replace=0, q_lora_rank=None,
        rope_interleave=False, norm_topk_prob=False, tie_word_embeddings=True, **MOE, **MLA)),
}


def hf_config(case):
    model_type, extra = CASES[case]
    kw = {**BASE, **extra}
    if "rope_scaling" in kw or "rope_theta" in kw:  # transformers 5 spelling
        kw["rope_parameters"] = {"rope_theta": kw.pop("rope_theta", 10000.0),
                                 **kw.pop("rope_scaling", {"rope_type": "default"})}
    return AutoConfig.for_model(model_type, **kw)


@torch.no_grad()
def randomize(model, seed=0):
    """Random weights everywhere, norms and biases included, so a mis-wired parameter shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def tokens(vocab, seed=1, shape=(2, 12)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_lmforge(case, tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config(case), attn_implementation="sdpa").float().eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    x = tokens(BASE["vocab_size"])
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_lmforge_to_transformers(case, tmp_path):
    cfg = from_hf(hf_config(case).to_dict())
    ours = build_model(cfg).eval()
    randomize(ours, seed=3)
    save_model(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    x = tokens(cfg.vocab_size, seed=2)
    with torch.no_grad():
        expected = ours(x).logits
        got = hf(x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # What we wrote is the family's own config.json, which transformers reads back unchanged.
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == CASES[case][0]
    assert from_hf(hf.config.to_dict()) == cfg
