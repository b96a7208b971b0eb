"""QLoRA: the NF4 code against bitsandbytes' table, blockwise quantisation (nearest level, error bounds,
stored bytes), the NF4 layer under LoRA/DoRA against the same adapters on its dequantised weight, and
`lmforge sft --quant nf4` end to end: the loss falls, PEFT loads the adapter onto the unquantised base,
resume, and the option errors."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lmforge.checkpoint import load_model
from lmforge.cli import main as cli_main
from lmforge.model.lora import LoraConfig, LoraLinear, load_adapter
from lmforge.model.nf4 import (
    NF4_CODE,
    NF4Linear,
    dequantize_nf4,
    quantize_linears_nf4,
    quantize_nf4,
)
from lmforge.settings import OptionError, parse_args_or_raise
from lmforge.train import sft

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]

# bitsandbytes' NF4 table, as published in bitsandbytes/functional.py (get_4bit_type("nf4")).
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def test_nf4_code_is_bitsandbytes_table():
    # Computed from the paper's definition; bitsandbytes rounds its offset to 0.9677083 and its
    # quantile points to fp32, hence the 1e-6.
    torch.testing.assert_close(NF4_CODE, torch.tensor(BNB_NF4), atol=1e-6, rtol=0)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7 and bool((NF4_CODE.diff() > 0).all())


def test_same_bytes_as_bitsandbytes_where_installed():
    """Not installed in CI (and not needed): where it is, its quantize_4bit must store what ours stores.
    With bitsandbytes 0.50.2's CPU backend: the same bytes, absmax equal, dequantised within 1.5e-8."""
    functional = pytest.importorskip("bitsandbytes.functional")
    w = weights((256, 512), seed=3)
    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w)
    assert torch.equal(packed.flatten().to(torch.uint8), ours.codes)
    torch.testing.assert_close(state.absmax.float(), ours.absmax, atol=0, rtol=0)
    torch.testing.assert_close(functional.dequantize_4bit(packed, state).float(), dequantize_nf4(ours))


def weights(shape, seed):
    """Normal weights whose scale varies across blocks, with a few outliers, as trained weights look."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g))
    w.view(-1)[torch.randint(0, w.numel(), (5,), generator=g)] *= 20
    return w


@pytest.mark.parametrize("shape", [(96, 64), (37, 29)])  # 29*37 is no multiple of 64: the last block is padded
def test_each_value_is_its_blocks_nearest_level(shape):
    w = weights(shape, seed=0)
    q = quantize_nf4(w)
    d = dequantize_nf4(q)
    assert d.shape == w.shape and q.absmax.dtype == torch.float32
    flat = torch.nn.functional.pad(w.flatten(), (0, (-w.numel()) % 64)).view(-1, 64)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(q.absmax, absmax.squeeze(1), atol=0, rtol=0)
    err = (torch.nn.functional.pad(d.flatten(), (0, (-w.numel()) % 64)).view(-1, 64) - flat).abs()
    # Per value: no level is nearer than the chosen one (brute force over all 16).
    best = ((flat / absmax)[..., None] - NF4_CODE).abs().amin(dim=-1) * absmax
    assert bool((err <= best + 1e-6 * absmax).all())
    # Per block: at most half the widest gap between levels, times the block's absmax; the absmax exact.
    half_gap = (NF4_CODE.diff().max() / 2).item()  # (1 - 0.7230) / 2
    assert bool((err <= half_gap * absmax + 1e-6).all())
    assert bool((err.gather(1, flat.abs().argmax(dim=1, keepdim=True)) == 0).all())
    # Dequantised values are fixed points: quantising them again stores the same codes.
    assert torch.equal(quantize_nf4(d).codes, q.codes)
    # And the error is what 4 bits buy: the mean error of a normal block is a few % of its absmax.
    assert (err / absmax).mean() < 0.05


def test_double_quant_scales_and_error():
    w = weights((256, 128), seed=1)
    plain, double = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert double.absmax.dtype == torch.int8 and double.scale_scale.numel() == 2  # 512 blocks of 64, 256 a scale
    # Each block's scale is off by at most half an int8 step of its group of 256 (less the mean).
    step = (plain.absmax - plain.absmax.mean()).view(2, 256).abs().amax(dim=1) / 127
    assert bool(((double.scales() - plain.absmax).view(2, 256).abs() <= step[:, None] / 2 + 1e-6).all())
    assert torch.equal(double.codes, plain.codes)  # the codes are the same; only the scales are coarser


def stored_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def test_nf4_memory_is_4_5_bits_a_weight():
    linear = torch.nn.Linear(512, 256, bias=False)
    numel = 512 * 256
    assert stored_bytes(NF4Linear(linear)) == numel // 2 + numel // 64 * 4  # 4 bits + an fp32 scale per 64
    assert stored_bytes(NF4Linear(linear)) * 8 / numel == 4.5
    # Double quantisation: an int8 scale per 64 and an fp32 scale per 256 of those, and the mean.
    assert stored_bytes(NF4Linear(linear, double_quant=True)) == numel // 2 + numel // 64 + numel // 64 // 256 * 4 + 4
    assert not dict(NF4Linear(linear).state_dict())  # derived from the base dir: no checkpoint holds them


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_on_nf4_equal_adapters_on_its_dequantised_weight(use_dora):
    """A LoraLinear on an NF4 base computes and trains exactly as one on an nn.Linear holding the dequantised
    weight (dropout on, in training: DoRA's path that recomputes the base product), in fp32 and under bf16
    autocast; only the 4-bit tensors are kept (no dequantised weight is saved for backward)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    nf4 = NF4Linear(linear)
    dense = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        dense.weight.copy_(nf4.dequantize())
        dense.bias.copy_(linear.bias)
    settings = LoraConfig(r=4, alpha=8, dropout=0.2, use_dora=use_dora)
    ours, ref = LoraLinear(nf4, settings), LoraLinear(dense, settings)
    assert ours.quantized and not any(p.requires_grad for p in nf4.parameters())
    with torch.no_grad():
        ref.lora_A.copy_(ours.lora_A)
        for m in (ours, ref):
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(1)))
        if use_dora:
            torch.testing.assert_close(ours.lora_magnitude_vector, ref.lora_magnitude_vector, atol=0, rtol=0)
    ref.weight.requires_grad_(False)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    for autocast in (False, True):
        outs, grads = [], []
        for m in (ours, ref):
            xm = x.clone().requires_grad_(True)
            torch.manual_seed(3)  # the same dropout masks
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = m.train()(xm)
            y.float().square().mean().backward()
            outs.append(y)
            grads.append([xm.grad] + [p.grad.clone() for p in (m.lora_A, m.lora_B)])
            m.zero_grad()
        assert outs[0].dtype == (torch.bfloat16 if autocast else torch.float32)
        tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[0], outs[1], **tol)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(ours.merged_weight(), ref.merged_weight(), atol=1e-6, rtol=1e-6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        ours.eval()(x.requires_grad_(True))
    assert saved and (48, 64) not in saved and (64, 48) not in saved  # the weight is dequantised again in backward


def test_quantize_linears_leaves_head_embeddings_and_norms(base_model):
    model = quantize_linears_nf4(load_model(base_model))
    layers = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 7 * model.config.num_hidden_layers and all(n.startswith("model.layers.") for n in layers)
    assert not any(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.startswith("model.layers."))
    numel = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    assert stored_bytes(model) - sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                                     if "layers" not in n) <= numel * 4.5 / 8 + 64 * len(layers)


def qlora_config(tmp_path, base_model, chats, *extra) -> sft.SFTConfig:
    return parse_args_or_raise(sft.SFTConfig, [
        "--model", str(base_model), "--data", str(chats), "--max-len", "64", "--batch-size", "4",
        "--train.steps", "8", "--train.eval-every", "0", "--train.save-every", "4", "--train.run-dir", str(tmp_path),
        "--train.optim.lr", "1e-2", "--train.optim.warmup-steps", "1", "--chunk-size", "16", "--lora.r", "4",
        "--lora.target-modules", "all-linear", "--quant", "nf4", *QUIET, *extra])


@pytest.mark.parametrize("method, precision", [("lora", "bf16"), ("dora", "bf16-pure")])
def test_sft_qlora_trains_and_peft_loads_the_adapter(tmp_path, base_model, chats, method, precision):
    """Under bf16 autocast and pure bf16 (the base dequantised to bf16, the adapters in fp32)."""
    result = sft.run(qlora_config(tmp_path, base_model, chats, "--method", method, "--lora.dropout", "0.1",
                                  "--train.precision", precision))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.3
    config = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora") and len(config["target_modules"]) == 14
    # The adapter applies to the unquantised base: PEFT on the transformers model equals lmforge's load.
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        base_logits = hf.eval()(ids).logits
        theirs = PeftModel.from_pretrained(hf, result.model_dir).eval()
        ours = load_adapter(load_model(base_model), result.model_dir).eval()
        adapted = theirs(ids).logits
        torch.testing.assert_close(ours(ids).logits, adapted, atol=1e-4, rtol=1e-4)
        assert (adapted - base_logits).abs().max() > 1e-2  # training changed the model
    assert cli_main(["merge", "--model", str(base_model), "--adapter", str(result.model_dir),
                     "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = load_model(tmp_path / "merged").eval()(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged, base_logits, atol=1e-2)
    if method == "lora":  # resuming from step 4 (the 4-bit base rebuilt from the model dir) repeats steps 5-8
        resumed = sft.run(qlora_config(tmp_path / "again", base_model, chats, "--method", method,
                                       "--lora.dropout", "0.1", "--train.precision", precision,
                                       "--train.resume", str(tmp_path / "checkpoint-000004")))
        assert [h["loss"] for h in resumed.history] == losses[4:]


def test_quant_option_errors_name_the_option(tmp_path, base_model, chats, capsys):
    args = ["sft", "--model", str(base_model), "--data", str(chats), "--train.run-dir", str(tmp_path), *QUIET]
    for extra, named in ((["--quant", "nf4"], "quant: nf4 needs method lora or dora"),
                         (["--quant", "nf4", "--method", "freeze"], "quant: nf4 needs method lora or dora"),
                         (["--method", "lora", "--double-quant"], "double_quant: needs quant nf4")):
        assert cli_main(args + extra) != 0
        err = capsys.readouterr().err.strip()
        assert named in err and len(err.splitlines()) == 1, err
    with pytest.raises(OptionError, match="quant"):
        parse_args_or_raise(sft.SFTConfig, ["--quant", "nf3"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_loading_layer_by_layer_equals_quantising_the_loaded_model(tmp_path, family):
    """sft's `--quant nf4` on a model directory: each block linear is read, quantised and dropped in turn (the
    full-precision base never whole in memory); the result is the model loaded whole, then quantised."""
    from train_helpers import tiny_model

    from lmforge.checkpoint import save_model

    extra = {"qwen2": dict(attention_bias=True), "mixtral": dict(num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=64)}.get(family, {})
    path = save_model(tiny_model(seed=5, model_type=family, **extra), tmp_path / family)
    whole = quantize_linears_nf4(load_model(path))
    by_layer = load_model(path, linear_hook=lambda linear: NF4Linear(linear))
    assert [type(m).__name__ for m in by_layer.modules()] == [type(m).__name__ for m in whole.modules()]
    ours, theirs = by_layer.state_dict(), whole.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for (name, a), (_, b) in zip(by_layer.named_modules(), whole.named_modules()):
        if isinstance(a, NF4Linear):  # the 4-bit codes and scales too (non-persistent buffers)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.absmax, b.absmax), name
            assert (a.bias is None) == (b.bias is None) and (a.bias is None or torch.equal(a.bias, b.bias))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(by_layer(ids).logits, whole(ids).logits)
