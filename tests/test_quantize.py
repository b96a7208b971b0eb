"""`lmforge quantize`: int8 / int4 round-to-nearest, the compressed-tensors format read and written both ways
(against that package and transformers' loader), and the quantised model run by the Engine and `generate`."""

import json

import pytest
import torch
from torch.nn import functional as F

from lmforge.checkpoint import load_model
from lmforge.cli import main as cli
from lmforge.infer import Engine
from lmforge.quantize import KERNEL_ROWS, QuantLinear, pack, quantize, quantize_weight, save_quantized, unpack
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMES = [("int8", None), ("int4", 32)]  # the tiny model's widths are 32 and 64: int4 groups of 32


@pytest.fixture(scope="module")
def quantized(base_model, tmp_path_factory):
    """{scheme: directory} of the tiny model quantised by the command."""
    out = tmp_path_factory.mktemp("quantized")
    dirs = {}
    for scheme, group in SCHEMES:
        argv = ["quantize", "--model", str(base_model), "--scheme", scheme, "--out", str(out / scheme)]
        assert cli(argv + (["--group-size", str(group)] if group else [])) == 0
        dirs[scheme] = out / scheme
    return dirs


def quant_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64), (4, 128)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    w[5] = 0  # an all-zero row quantises to zeros, not NaN
    q, scale = quantize_weight(w, bits, group)
    assert q.dtype == torch.int8 and int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
    assert scale.shape == (48, 1 if group is None else 256 // group)
    step = scale.repeat_interleave(256 // scale.shape[1], dim=1)
    deq = q.float() * step
    assert ((w - deq).abs() <= step / 2 + 1e-6 * w.abs()).all()  # float rounding at the clamped top level
    assert (deq[5] == 0).all()
    # the whole range is used: each row's (group's) largest |w| lands on the top or bottom level
    assert int(q.abs().max()) >= 2 ** (bits - 1) - 1
    assert torch.equal(unpack(pack(q, bits), bits, tuple(q.shape)), q)


def test_pack_order_is_compressed_tensors(bits=4):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 40), generator=torch.Generator().manual_seed(1),
                      dtype=torch.int8)  # 40: the last word of a row half full
    for b in (4, 8):
        qb = q if b == 8 else q.clamp(-8, 7)
        assert torch.equal(pack(qb, b), pack_to_int32(qb, b))
        assert torch.equal(unpack(pack_to_int32(qb, b), b, tuple(qb.shape)), qb)
        assert torch.equal(unpack_from_int32(pack(qb, b), b, torch.tensor(qb.shape)), qb)


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_quantised_model_is_close_to_fp32_and_its_matmul_is_dequantize_then_matmul(base_model, quantized,
                                                                                    scheme, group):
    fp32, model = load_model(base_model), load_model(quantized[scheme])
    layers = quant_layers(model)
    assert len(layers) == 2 * 7  # every projection of both blocks, nothing else (not the embeddings, no lm_head)
    for name, layer in layers.items():
        w = fp32.get_submodule(name).weight
        assert (layer.bits, layer.group_size) == ((8, None) if scheme == "int8" else (4, group))
        step = layer.weight_scale.repeat_interleave(w.shape[1] // layer.weight_scale.shape[1], dim=1)
        assert ((w - layer.dequantized()).abs() <= step / 2 + 1e-6 * w.abs()).all(), name
        generator = torch.Generator().manual_seed(0)
        few, many = (torch.randn(*shape, layer.in_features, generator=generator) for shape in ((3, 5), (4, 8)))
        assert few.shape[:2].numel() <= KERNEL_ROWS < many.shape[:2].numel()
        deq = layer.dequantized()
        torch.testing.assert_close(layer(many), F.linear(many, deq), rtol=1e-5, atol=1e-5)
        # PyTorch's packed kernels take bf16 activations and give bf16 outputs (int4: bf16 scales, too)
        reference = F.linear(few.bfloat16().float(), deq)
        assert float((layer(few) - reference).abs().max()) <= 2**-7 * float(reference.abs().max()), name
    for shape in ((2, 24), (1, 12)):  # dequantize-then-matmul; PyTorch's packed kernels
        tokens = torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, out = fp32(tokens).logits, model(tokens).logits
        relative = float((out - ref).norm() / ref.norm())
        assert 0 < relative < (0.005 if scheme == "int8" else 0.06), (shape, relative)  # seen: 0.0016, 0.029


def test_files_are_smaller_and_the_config_is_compressed_tensors(base_model, quantized):
    from safetensors import safe_open

    def tensors(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}

    fp32 = tensors(base_model)
    proj = {n: t.shape for n, t in fp32.items() if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    original = sum(fp32[n].numel() * 4 for n in proj)
    for scheme, group in SCHEMES:
        q = tensors(quantized[scheme])
        packed = sum(t.numel() * t.element_size() for n, t in q.items() if n.rsplit(".", 1)[0] + ".weight" in proj)
        # a weight in 1 byte (int8) or half a byte (int4), an fp32 scale per row (int8) or per group (int4), and the
        # 16-byte weight_shape: at these widths (32, 64) about 0.28 of fp32 for int8, 0.16 for int4
        bits, inputs_per_scale = (8, None) if group is None else (4, group)
        expected = sum(out * in_ * bits // 8 + out * (in_ // (inputs_per_scale or in_)) * 4 + 16
                       for out, in_ in proj.values())
        assert packed == expected, (scheme, packed, expected)
        assert packed / original < (0.29 if scheme == "int8" else 0.17)
        assert (quantized[scheme] / "model.safetensors").stat().st_size \
            < (base_model / "model.safetensors").stat().st_size
        config = json.loads((quantized[scheme] / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
        weights = config["config_groups"]["group_0"]["weights"]
        assert weights["num_bits"] == (8 if scheme == "int8" else 4) and weights["symmetric"] is True
        assert (weights["strategy"], weights["group_size"]) == (("group", group) if group else ("channel", None))
        assert config["ignore"] == ["lm_head"]
        assert (quantized[scheme] / "tokenizer.json").is_file()


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_compressed_tensors_and_transformers_read_our_directory(quantized, scheme, group):
    """transformers' loader, through compressed-tensors' decompressor, gives our dequantised weights and logits."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(quantized[scheme], dtype=torch.float32)
    ours = load_model(quantized[scheme])
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))  # > KERNEL_ROWS: fp32
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens).logits, rtol=1e-5, atol=1e-5)
    weights = hf.state_dict()  # decompressed by the forward above (compressed-tensors' decompression hook)
    for name, layer in quant_layers(ours).items():
        assert torch.equal(weights[f"{name}.weight"], layer.dequantized()), name


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, True), (4, 32, False)])
def test_we_read_what_compressed_tensors_writes(base_model, tmp_path, bits, group, symmetric):
    """A directory compressed by compressed-tensors' own ModelCompressor loads in lmforge with the weights that
    its fake_quantize gives, and our quantiser picks the same integers. Asymmetric int4 (llm-compressor's
    W4A16_ASYM, zero points packed along the output dim) loads too, and its kernel path agrees."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel" if group is None else "group", group_size=group)
    apply_quantization_config(hf, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    expected = {}
    for name, module in hf.named_modules():
        if getattr(module, "quantization_scheme", None) is not None:  # its min-max observer, on the weight
            w = module.weight.data
            grouped = w.view(w.shape[0], -1, group or w.shape[1])
            scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero_point)
            expected[name] = fake_quantize(w, scale, zero_point, args)
    compressor = ModelCompressor.from_pretrained_model(hf)
    compressor.compress_model(hf)
    hf.save_pretrained(tmp_path)
    compressor.update_config(tmp_path)
    ours = load_model(tmp_path)
    layers = quant_layers(ours)
    assert set(layers) == set(expected) and len(layers) == 14
    fp32 = load_model(base_model)
    for name, layer in layers.items():
        assert torch.equal(layer.dequantized(), expected[name]), name
        if symmetric:
            q, scale = quantize_weight(fp32.get_submodule(name).weight, bits, group)
            assert torch.equal(q, layer.qweight) and torch.equal(scale, layer.weight_scale), name
        else:
            assert layer.weight_zero_point.abs().sum() > 0
            few = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
            reference = F.linear(few.bfloat16().float(), layer.dequantized())
            assert float((layer(few) - reference).abs().max()) <= 2**-6 * float(reference.abs().max()), name
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = fp32(tokens).logits, ours(tokens).logits
    assert float((out - ref).norm() / ref.norm()) < (0.005 if bits == 8 else 0.06)
    # saved again by lmforge (zero points packed as compressed-tensors packs them): the same weights
    again = load_model(save_quantized(ours, tmp_path, tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]["symmetric"] is symmetric
    for name, layer in quant_layers(again).items():
        assert torch.equal(layer.dequantized(), expected[name]), name


def test_generate_on_a_quantised_directory_is_the_argmax_chain(quantized, capsys):
    """`generate` on an int4 directory: the C decoder runs its layers (cpu_decode.c; tests/test_cpu_decode_quant.py
    compares its logits with QuantLinear's forward), and its greedy tokens follow the argmax chain of the
    PyTorch forward for at least the first 6 of 12 (its int8 activations may break a near-tie)."""
    assert Engine.from_pretrained(quantized["int4"]).cpu_decoder is not None
    model = load_model(quantized["int4"])
    tokenizer = Tokenizer.from_dir(quantized["int4"])
    argv = ["generate", "--model", str(quantized["int4"]), "--prompt", "The cat", "--temperature", "0",
            "--max-new-tokens", "12", "--ignore-eos", "--logprobs", "--prompt-logprobs", "0"]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    prompt = [line["id"] for line in lines if line.get("prompt")]
    generated = [line["id"] for line in lines if not line.get("prompt")]
    assert len(prompt) >= 2 and len(generated) == 12
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    # int8 activations in C: a near-tie may go the other way, after which the chains part; most agree
    agree = next((i for i, (a, b) in enumerate(zip(generated, ids[len(prompt):])) if a != b), 12)
    assert agree >= 6, (generated, ids[len(prompt):])
    assert captured.out == tokenizer.decode(generated) + "\n"
    for scheme in quantized:  # bf16 activations and scales run too (their text may differ: only check it runs)
        assert cli(["generate", "--model", str(quantized[scheme]), "--prompt", "The cat", "--dtype", "bfloat16",
                    "--max-new-tokens", "4", "--ignore-eos"]) == 0
        assert "4 tokens in" in capsys.readouterr().err


def test_bad_input_is_one_line_naming_it(base_model, quantized, tmp_path, capsys):
    def error(*argv):
        assert cli(["quantize", "--model", str(base_model), "--out", str(tmp_path / "q"), *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmforge: error: ")
        return err

    with pytest.raises(SystemExit) as exit_status:  # the option parser's usage error
        cli(["quantize", "--model", str(base_model), "--out", str(tmp_path / "q"), "--scheme", "int3"])
    err = capsys.readouterr().err
    assert exit_status.value.code == 2 and err.count("\n") == 1 and "scheme" in err and "'int3'" in err
    with pytest.raises(ValueError, match="unknown scheme 'int3': one of int8, int4"):
        quantize(base_model, "int3", tmp_path / "q")
    assert "group size 64 does not divide the input width 32 of model.layers.0.self_attn.q_proj" in error(
        "--scheme", "int4", "--group-size", "64")
    assert "group size 48: one of 32, 64, 128" in error("--scheme", "int4", "--group-size", "48")
    assert not (tmp_path / "q").exists()
    assert cli(["quantize", "--model", str(quantized["int8"]), "--scheme", "int8", "--out", str(tmp_path / "q")]) == 1
    assert "already quantised" in capsys.readouterr().err
    assert cli(["quantize", "--model", str(base_model), "--scheme", "int4", "--method", "rtn", "--group-size", "32",
                "--out", str(tmp_path / "q")]) == 0  # rtn: round to nearest, the default (awq: test_awq.py)
    assert load_model(tmp_path / "q").model.layers[0].mlp.down_proj.bits == 4


def test_eval_runs_the_quantised_model(base_model, quantized, tmp_path):
    """`lmforge eval` on the int8 directory: bits per byte within 1% of fp32's, not equal to it."""
    text = tmp_path / "text.txt"
    text.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York.\n" * 3)
    bpb = {}
    for name, model in (("fp32", base_model), ("int8", quantized["int8"])):
        out = tmp_path / name
        assert cli(["eval", "--model", str(model), "--tasks", f"bpb:{text}", "--out", str(out)]) == 0
        bpb[name] = json.loads((out / "results.json").read_text())["results"][f"bpb:{text}"]["bits_per_byte"]
    assert bpb["int8"] != bpb["fp32"] and abs(bpb["int8"] / bpb["fp32"] - 1) < 0.01, bpb


def test_moe_experts_are_quantised_and_routers_named_in_ignore(tmp_path):
    """Mixtral (its experts' on-disk names w1/w3/w2 under block_sparse_moe): every expert quantised, the routers
    left in float and listed in `ignore` (the loaders' `Linear` targets would match them), logits near fp32."""
    from safetensors import safe_open
    from train_helpers import tiny_config

    from lmforge.checkpoint import save_model
    from lmforge.model import build_model

    model = build_model(tiny_config(model_type="mixtral", num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=64, vocab_size=300), seed=0)
    save_model(model, tmp_path / "fp32")
    assert cli(["quantize", "--model", str(tmp_path / "fp32"), "--scheme", "int8", "--out", str(tmp_path / "q")]) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head", *(f"model.layers.{i}.block_sparse_moe.gate" for i in range(2))]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in f.keys()
    quantized = load_model(tmp_path / "q")
    assert len(quant_layers(quantized)) == 2 * (4 + 4 * 3)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(tokens).logits, quantized(tokens).logits
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.005


def test_a_bf16_model_stays_bf16(base_model, tmp_path):
    """The source's dtype is kept: embeddings and norms bf16 on disk, the scales bf16 (as compressed-tensors keeps
    them), each weight within about half a step of the bf16 weight."""
    from safetensors import safe_open

    from lmforge.checkpoint import save_model

    bf16 = load_model(base_model, dtype=torch.bfloat16)
    save_model(bf16, tmp_path / "bf16")
    assert cli(["quantize", "--model", str(tmp_path / "bf16"), "--scheme", "int4", "--group-size", "32",
                "--out", str(tmp_path / "q")]) == 0
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        dtypes = {name: f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.mlp.up_proj.weight_scale"] == torch.bfloat16
    for name, layer in quant_layers(load_model(tmp_path / "q")).items():
        w = bf16.get_submodule(name).weight.detach().float()
        step = layer.weight_scale.float().repeat_interleave(32, dim=1)
        # a bf16 scale is max|w| / 7.5 rounded by up to 2^-8 of itself, so a group's largest weight, clamped to
        # the top level, may miss it by up to 0.5 + 7.5 x 2^-8 steps
        assert ((w - layer.dequantized().float()).abs() <= step * (0.5 + 7.5 * 2**-8)).all(), name


def test_int8_layers_of_any_width_equal_their_dequantised_matmul():
    """PyTorch's int8 packed kernel misreads inputs whose width is not a multiple of 16 (torch 2.13): such a
    layer takes the dequantised path, so every width gives the dequantised weight's product."""
    torch.manual_seed(0)
    for width in (192, 200, 264):
        linear = torch.nn.Linear(width, 48, bias=False)
        layer = QuantLinear.from_linear(linear, 8, None, torch.float32)
        x = torch.randn(3, width)
        reference = x @ layer.dequantized(torch.float32).T
        assert (layer(x) - reference).abs().max() < 0.02 * reference.abs().max(), width
