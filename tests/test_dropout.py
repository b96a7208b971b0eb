"""Dropout: embedding (embd_pdrop), attention (attention_dropout) and residual (resid_pdrop), in training mode
only; 0 changes nothing; config.json round-trips and loads in transformers; `--dropout` of pretrain and sft."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import tiny_model

from lmforge.checkpoint import load_model, save_model
from lmforge.config import ModelConfigError, from_hf, to_hf
from lmforge.settings import OptionError, parse_args_or_raise
from lmforge.train import pretrain, sft
from lmforge.train.stage import set_dropout

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["embd_pdrop", "attention_dropout", "resid_pdrop"]
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]


def logits(model, ids, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(ids).logits


def test_no_dropout_changes_nothing_and_draws_no_random_numbers():
    model, ids = tiny_model(), torch.randint(0, 96, (2, 12))
    evaluated = logits(model.eval(), ids)
    model.train()
    state = torch.get_rng_state()
    with torch.no_grad():
        trained = model(ids).logits
    assert torch.equal(trained, evaluated) and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["gqa", "mla", "bf16"])
def test_each_dropout_acts_in_training_reproducibly_and_never_in_eval(kind, variant):
    overrides = {"mla": dict(model_type="deepseek_v3", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                             v_head_dim=8, num_key_value_heads=4, num_experts=0)}.get(variant, {})
    model, ids = tiny_model(**overrides, **{kind: 0.3}), torch.randint(0, 96, (2, 12))
    reference = tiny_model(**overrides).eval()  # the same weights, no dropout
    if variant == "bf16":  # the CPU's own bf16 attention path has no dropout: it must give way to SDPA
        model, reference = model.to(torch.bfloat16), reference.to(torch.bfloat16)
        for p in model.parameters():
            p.requires_grad_(True)
    assert torch.equal(logits(model.eval(), ids), logits(reference, ids))
    model.train()
    with torch.enable_grad():
        torch.manual_seed(1)
        first = model(ids).logits.detach()
        torch.manual_seed(1)
        again = model(ids).logits.detach()
        torch.manual_seed(2)
        other = model(ids).logits.detach()
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.allclose(first, logits(reference, ids))


def test_config_round_trips_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    rates = dict(embd_pdrop=0.1, attention_dropout=0.2, resid_pdrop=0.3)
    model = tiny_model(**rates)
    save_model(model, tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {k: written[k] for k in rates} == rates
    assert {k: getattr(load_model(tmp_path / "m").config, k) for k in rates} == rates
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert hf.config.attention_dropout == 0.2
    ids = torch.randint(0, 96, (1, 10))
    torch.testing.assert_close(hf(ids).logits, logits(load_model(tmp_path / "m").eval(), ids), rtol=1e-4, atol=1e-4)
    # without dropout config.json is as before: only the family's own attention_dropout, 0
    plain = to_hf(tiny_model().config)
    assert plain["attention_dropout"] == 0.0 and "embd_pdrop" not in plain and "resid_pdrop" not in plain


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", None])
def test_bad_rates_in_config_json_are_named(value):
    d = {**to_hf(tiny_model().config), "resid_pdrop": value}
    if value is None:  # absent or null: no dropout
        assert from_hf(d).resid_pdrop == 0.0
        return
    with pytest.raises(ModelConfigError, match="resid_pdrop: .* is not a dropout probability"):
        from_hf(d)


def test_stage_options_set_the_rates_and_name_bad_ones():
    cfg = parse_args_or_raise(sft.SFTConfig, ["--dropout", "0.1", "--attention-dropout", "0"])
    model = tiny_model(resid_pdrop=0.5)
    set_dropout(model, cfg)
    assert (model.config.embd_pdrop, model.config.attention_dropout, model.config.resid_pdrop) == (0.1, 0.0, 0.1)
    kept = tiny_model(resid_pdrop=0.5)
    set_dropout(kept, parse_args_or_raise(sft.SFTConfig, []))  # none given: the model's own rates
    assert kept.config.resid_pdrop == 0.5
    with pytest.raises(OptionError, match="residual_dropout: 1.0 is not a dropout probability"):
        set_dropout(model, parse_args_or_raise(sft.SFTConfig, ["--residual-dropout", "1"]))
    with pytest.raises(OptionError, match="dropout: -0.2 is out of range"):
        parse_args_or_raise(pretrain.PretrainConfig, ["--dropout", "-0.2"])


def test_pretrain_dropout_reaches_the_model_and_its_checkpoint(tmp_path, corpus, base_model):
    _, data = corpus
    cfg = parse_args_or_raise(pretrain.PretrainConfig, [
        "--model", str(base_model), "--data", str(data), "--seq-len", "32", "--batch-size", "2", "--eval-batches",
        "1", "--train.steps", "2", "--train.run-dir", str(tmp_path), "--dropout", "0.1", "--embedding-dropout",
        "0.05", *QUIET])
    result = pretrain.run(cfg)
    config = load_model(result.model_dir).config
    assert (config.embd_pdrop, config.attention_dropout, config.resid_pdrop) == (0.05, 0.1, 0.1)
