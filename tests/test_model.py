"""The model on its own: KV-cache decoding, routing, the auxiliary loss, packing masks, sizes."""

import math

import pytest
import torch

from lmforge.config import ModelConfig, preset
from lmforge.model import build_model, flops_per_token, matmul_params_per_token, num_parameters
from lmforge.model.moe import MoE, Router, load_balancing_loss

SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
VARIANTS = {
    "dense": ModelConfig(model_type="llama", **SMALL),
    "window": ModelConfig(model_type="mistral", sliding_window=4, **SMALL),
    "moe": ModelConfig(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, attention_bias=True, **SMALL),
    "mla": ModelConfig(model_type="deepseek_v3", **{**SMALL, "num_key_value_heads": 4}, kv_lora_rank=16,
                       q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, n_group=2,
                       topk_group=1, scoring_func="sigmoid", expert_score_bias=True, first_k_dense_replace=1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_cached_decoding_equals_full_forward(variant):
    model = build_model(VARIANTS[variant], seed=0).eval()
    x = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(0))
    full = model(x).logits
    cache = model.new_cache(batch_size=1, max_len=32)
    steps = [model(x[:, :5], position_ids=torch.arange(5)[None], cache=cache).logits]  # prefill
    for t in range(5, 14):  # then one token at a time
        steps.append(model(x[:, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.layers[0][0].shape[-1] == (16 if variant == "mla" else 12)  # MLA caches the latent


@pytest.mark.parametrize("variant", ["dense", "mla"])
@torch.no_grad()
def test_cache_rows_at_different_positions(variant):
    """Two rows at different lengths in one cache (what batched and continuous decoding rely on)."""
    model = build_model(VARIANTS[variant], seed=1).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 97, (1, 9), generator=g), torch.randint(0, 97, (1, 4), generator=g)
    cache = model.new_cache(batch_size=2, max_len=16)
    # Prefill both rows together, right-padding the shorter one; its pad entries get overwritten later.
    padded = torch.cat([a[:, :6], torch.cat([b[:, :3], torch.zeros(1, 3, dtype=torch.long)], 1)])
    model(padded, position_ids=torch.arange(6).expand(2, 6), cache=cache)
    # Row 0 continues at position 6, row 1 at position 3.
    out = model(torch.tensor([[a[0, 6]], [b[0, 3]]]), position_ids=torch.tensor([[6], [3]]), cache=cache).logits
    torch.testing.assert_close(out[0, 0], model(a[:, :7]).logits[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 0], model(b).logits[0, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_documents_do_not_see_each_other():
    model = build_model(VARIANTS["dense"], seed=2).eval()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 97, (1, 5), generator=g), torch.randint(0, 97, (1, 7), generator=g)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    docs = torch.tensor([[0] * 5 + [1] * 7])
    out = model(packed, position_ids=positions, document_ids=docs).logits
    torch.testing.assert_close(out[:, :5], model(a).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(b).logits, atol=1e-5, rtol=1e-5)


def _router(num_experts=4, k=2, **kw):
    cfg = ModelConfig(model_type="deepseek_v3" if kw.get("scoring_func") == "sigmoid" else "qwen3_moe",
                      hidden_size=4, num_attention_heads=1, num_key_value_heads=1, num_experts=num_experts,
                      num_experts_per_tok=k, moe_intermediate_size=4, **kw)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts, 4))  # logits = the token's first num_experts features
    return router


def test_softmax_router_top_k_and_renormalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = logits.softmax(-1)[0]
    weights, experts, _ = _router(norm_topk_prob=True)(logits)
    assert experts.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.tensor([[p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])]]))
    weights, _, _ = _router(norm_topk_prob=False)(logits)
    torch.testing.assert_close(weights, p[:2][None])


def test_sigmoid_router_bias_chooses_but_does_not_weigh():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    router = _router(scoring_func="sigmoid", expert_score_bias=True, norm_topk_prob=False, routed_scaling_factor=2.0)
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # pushes expert 2 into the top 2
    weights, experts, _ = router(logits)
    assert sorted(experts[0].tolist()) == [0, 2]
    s = logits.sigmoid()[0]
    got = dict(zip(experts[0].tolist(), weights[0].tolist()))
    assert got[0] == pytest.approx(2.0 * s[0].item()) and got[2] == pytest.approx(2.0 * s[2].item())


def test_group_limited_routing():
    # Groups {0,1} and {2,3}; group 2 has the two best summed scores even though expert 0 is the single best.
    logits = torch.tensor([[3.0, -3.0, 2.0, 2.0]])
    router = _router(scoring_func="sigmoid", expert_score_bias=True, n_group=2, topk_group=1)
    _, experts, _ = router(logits)
    assert sorted(experts[0].tolist()) == [2, 3]
    ungrouped = _router(scoring_func="sigmoid", expert_score_bias=True)
    assert 0 in ungrouped(logits)[1][0].tolist()


def test_load_balancing_loss_by_hand():
    # Two tokens, two experts, top-1: both go to expert 0. f = [1, 0], P = [0.85, 0.15] -> 2 * 0.85.
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    experts = torch.tensor([[0], [0]])
    assert load_balancing_loss(scores, experts, 2).item() == pytest.approx(1.7)
    # Perfect balance gives k (here 1).
    balanced = load_balancing_loss(torch.full((2, 2), 0.5), torch.tensor([[0], [1]]), 2)
    assert balanced.item() == pytest.approx(1.0)


def test_load_balancing_loss_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 6, generator=g)
    experts = logits.softmax(-1).topk(2, dim=-1).indices
    ours = load_balancing_loss(logits.softmax(-1), experts, 6)
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert transformers is not None


def test_aux_free_bias_update():
    cfg = ModelConfig(model_type="deepseek_v3", hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
                      num_experts=3, num_experts_per_tok=1, moe_intermediate_size=4, scoring_func="sigmoid",
                      expert_score_bias=True, kv_lora_rank=4, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=2)
    moe = MoE(cfg)
    moe.expert_load.copy_(torch.tensor([5.0, 1.0, 0.0]))  # mean 2: expert 0 overloaded, 1 and 2 under
    moe.gate.e_score_correction_bias.zero_()
    moe.update_score_bias(0.01)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01]))


def test_moe_forward_records_load_and_returns_aux():
    model = build_model(VARIANTS["moe"], seed=0).train()
    out = model(torch.randint(0, 97, (2, 8)))
    loads = [layer.mlp.expert_load for layer in model.model.layers if layer.is_moe]
    assert all(load.sum().item() == 2 * 8 * 2 for load in loads)  # every token used k=2 experts
    assert out.aux_loss is not None and out.aux_loss.item() >= 2.0 - 1e-5  # >= k, equality at balance
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # the aux loss trains the router


def test_presets_sizes_and_flops():
    small = preset("small")
    model = build_model(small, device="meta")
    n = num_parameters(model)
    assert 24e6 < n < 28e6  # MiniMind2-small's ~26M
    assert 1e6 < num_parameters(build_model(preset("tiny"), device="meta")) < 6e6
    # Dense: 6N + attention; N counts the output projection but not the embedding lookup.
    expected = 6 * matmul_params_per_token(small) + 12 * 8 * 512 * 256
    assert flops_per_token(small, 256) == pytest.approx(expected)
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert matmul_params_per_token(small) == n - norms  # tied: the embedding matrix is the output projection
    moe = preset("small-moe")
    assert matmul_params_per_token(moe) < num_parameters(build_model(moe, device="meta"))  # only k experts active


def test_init_scheme():
    model = build_model(preset("tiny"), seed=0)
    std = model.config.initializer_range
    q = model.model.layers[0].self_attn.q_proj.weight
    o = model.model.layers[0].self_attn.o_proj.weight
    assert q.std().item() == pytest.approx(std, rel=0.05)
    assert o.std().item() == pytest.approx(std / math.sqrt(2 * model.config.num_hidden_layers), rel=0.05)
    assert torch.all(model.model.norm.weight == 1)


def test_rope_stays_fp32_in_bf16_models():
    model = build_model(preset("tiny"), dtype=torch.bfloat16)
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
