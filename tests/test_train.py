"""The Trainer: learning, schedules, accumulation, precision, exact resume, SIGKILL, NaN guard, logging,
activation checkpointing, compile, MoE balancing; and the chunked objectives against plain PyTorch."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import VOCAB, RandomBatches, tiny_config, tiny_model

from lmforge.model import build_model
from lmforge.train.checkpointing import complete_checkpoints
from lmforge.train.objectives import causal_lm_loss, chunked_cross_entropy
from lmforge.train.schedule import lr_at
from lmforge.train.trainer import NonFiniteError, OptimConfig, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def config(run_dir, **kw) -> TrainConfig:
    kw = {"optim": OptimConfig(lr=3e-3, warmup_steps=2), "save_every": 0, **kw}
    return TrainConfig(run_dir=str(run_dir), progress=False, device="cpu", **kw)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


# -- the objectives -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_full_logits(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy((hidden @ weight.T).float().flatten(0, 1), labels.flatten())
    reference.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, reference, **tol)
    torch.testing.assert_close(grads[0], hidden.grad, **tol)
    torch.testing.assert_close(grads[1], weight.grad, **tol)


def test_causal_lm_loss_never_holds_more_than_a_chunk_of_logits():
    """Forward and backward of the training loss create no vocabulary-wide tensor of more than chunk_size
    rows (every op's output recorded below the autograd layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB
                        and t.untyped_storage().data_ptr() not in inputs):  # views (w.T) hold no memory
                    Largest.rows = max(Largest.rows, t.numel() // VOCAB)
            return out

    model, batch = tiny_model(), RandomBatches(4, 16).batch(0)  # 64 tokens
    with Largest():
        loss, _ = causal_lm_loss(model, batch, chunk_size=8)
        loss.backward()
    assert Largest.rows == 8
    with Largest():  # the recording sees the full logits when they exist
        causal_lm_loss(model, batch, chunk_size=64)
    assert Largest.rows == 64


def test_chunked_cross_entropy_all_ignored_is_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, torch.randn(10, 8), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def test_model_loss_equals_full_logits():
    model = tiny_model(tie_word_embeddings=False)
    ids = torch.randint(0, 96, (2, 9))
    labels = torch.randint(0, 96, (2, 9))
    labels[1, 4:] = -100
    loss, metrics = causal_lm_loss(model, {"input_ids": ids, "labels": labels}, chunk_size=3)
    torch.testing.assert_close(loss, F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten()))
    assert metrics["tokens"] == 13


# -- schedules -----------------------------------------------------------------------------------------

def test_schedules_at_known_steps():
    kw = dict(total=110, peak=1.0, floor=0.1, warmup=10)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    # cosine: halfway through the decay it is halfway between peak and floor; the last step is the floor
    assert lr_at(59, **kw) == pytest.approx(0.55)
    assert lr_at(109, **kw) == pytest.approx(0.1)
    assert lr_at(34, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(59, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_at(34, schedule="linear", **kw) == pytest.approx(1.0 - 0.9 * 0.25)
    # wsd: flat at the peak until the last 20% (22 steps), then linear to the floor
    assert lr_at(87, schedule="wsd", **kw) == pytest.approx(1.0)
    assert lr_at(88, schedule="wsd", **kw) == pytest.approx(1.0 - 0.9 / 22)
    assert lr_at(109, schedule="wsd", **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(50, schedule="step", **kw)


# -- the loop ------------------------------------------------------------------------------------------

def test_loss_decreases_and_outputs(tmp_path):
    data = RandomBatches(8, 16)
    result = Trainer(config(tmp_path, steps=40, eval_every=20, peak_flops=1e11,
                            optim=OptimConfig(lr=1e-2, warmup_steps=5)),
                     tiny_model(), causal_lm_loss, data, val_data=data.validation(),
                     bytes_per_token=2.0, flops_per_token=1e6).fit()
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert result.val_loss < losses[0] - 0.5
    assert result.val_bpb == pytest.approx(result.val_loss / math.log(2) / 2.0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert all(r["mfu"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows if "loss" in r)
    for r in rows:  # MFU = achieved FLOP/s / peak, from the given flops_per_token and peak_flops
        if "loss" in r:
            assert r["mfu"] == pytest.approx(r["tokens_per_s"] * 1e6 / 1e11, rel=1e-3)
        if "val_loss" in r:
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert result.loss_curve.stat().st_size > 1000
    assert (tmp_path / "final").resolve() == result.model_dir.resolve()
    assert (result.model_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("prompts", [False, True])
def test_grad_accumulation_equals_one_big_batch(tmp_path, prompts):
    """k micro-batches of n rows = one batch of k*n rows (same rows): equal grad norms and weights, also
    when the micro-batches train on unequal numbers of tokens (masked prompts: each token weighs the same)."""

    class Halves(RandomBatches):  # micro-batch j of step s holds half j of the global batch s
        def __next__(self):
            full = self.batch(self.index // 2)
            half = slice(0, 2) if self.index % 2 == 0 else slice(2, 4)
            self.index += 1
            return {k: v[half] for k, v in full.items()}

    big = Trainer(config(tmp_path / "big", steps=3), tiny_model(), causal_lm_loss, RandomBatches(4, prompts=prompts))
    small = Trainer(config(tmp_path / "small", steps=3, grad_accum=2), tiny_model(), causal_lm_loss,
                    Halves(4, prompts=prompts))
    a, b = big.fit(), small.fit()
    torch.testing.assert_close([h["grad_norm"] for h in a.history], [h["grad_norm"] for h in b.history])
    torch.testing.assert_close([h["loss"] for h in a.history], [h["loss"] for h in b.history])
    for (name, p), q in zip(params(big.inner).items(), params(small.inner).values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)  # Adam magnifies rounding of ~0 grads


def noisy_loss(model, batch):
    """A loss that draws from torch's RNG (random label dropping), so resuming must restore it."""
    labels = batch["labels"].masked_fill(torch.rand(batch["labels"].shape) < 0.2, -100)
    return causal_lm_loss(model, {**batch, "labels": labels})


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
def test_interrupted_and_resumed_run_reproduces_losses_exactly(tmp_path, precision):
    kw = dict(steps=8, save_every=3, keep_last=2, precision=precision, eval_every=4)
    data = RandomBatches(4)
    full = Trainer(config(tmp_path / "full", **kw), tiny_model(), noisy_loss, RandomBatches(4),
                   val_data=data.validation()).fit()
    # checkpoints at steps 3, 6 and the end (8); keep_last=2 pruned step 3's
    assert [p.name for p in complete_checkpoints(tmp_path / "full")] == ["checkpoint-000006", "checkpoint-000008"]

    train_calls = 0

    def crashing_loss(model, batch):
        nonlocal train_calls
        train_calls += model.training
        if model.training and train_calls == 8:  # in step 8: the newest checkpoint is step 6's
            raise Interrupt
        return noisy_loss(model, batch)

    with pytest.raises(Interrupt):
        Trainer(config(tmp_path / "cut", **kw), tiny_model(), crashing_loss, RandomBatches(4),
                val_data=data.validation()).fit()
    assert [p.name for p in complete_checkpoints(tmp_path / "cut")] == ["checkpoint-000003", "checkpoint-000006"]
    # What a kill can leave: a cut-off metrics line, half-written and half-deleted checkpoint directories.
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')
    for stale in (".checkpoint-000009.tmp", "..checkpoint-000009.tmp.tmp-123", ".checkpoint-000001.deleting"):
        (tmp_path / "cut" / stale).mkdir()
    resumed_trainer = Trainer(config(tmp_path / "cut", resume="auto", **kw), tiny_model(seed=99), noisy_loss,
                              RandomBatches(4), val_data=data.validation())
    resumed = resumed_trainer.fit()
    assert [h["step"] for h in resumed.history] == [7, 8]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[6:]]
    assert resumed.val_loss == full.val_loss
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # no duplicated steps
    assert not list((tmp_path / "cut").glob(".*checkpoint-*"))


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    seen = []

    def poisoned(model, batch):
        seen.append(params(model))  # the weights each step starts from
        loss, metrics = causal_lm_loss(model, batch)
        return (loss * float("nan") if len(seen) == 3 else loss), metrics

    trainer = Trainer(config(tmp_path, steps=5), tiny_model(), poisoned, RandomBatches(4))
    with pytest.raises(NonFiniteError, match="step 3"):
        trainer.fit()
    after = params(trainer.inner)
    assert all(torch.equal(seen[2][n], after[n]) for n in after)  # the NaN step changed nothing
    assert not all(torch.equal(seen[1][n], after[n]) for n in after)  # while step 2 did train


def test_nonfinite_gradient_with_a_finite_loss_stops(tmp_path):
    """The guard reads the gradient norm too: a finite loss whose gradient is NaN stops the run, untrained."""
    seen = []

    def poisoned(model, batch):
        seen.append(params(model))
        loss, metrics = causal_lm_loss(model, batch)
        if len(seen) == 2:  # sqrt'(0) = inf, times 0: NaN gradients under a finite loss
            loss = loss + torch.sqrt(sum(p.sum() for p in model.parameters()) * 0.0)
        return loss, metrics

    trainer = Trainer(config(tmp_path, steps=3), tiny_model(), poisoned, RandomBatches(4))
    with pytest.raises(NonFiniteError, match="step 2"):
        trainer.fit()
    after = params(trainer.inner)
    assert all(torch.equal(seen[1][n], after[n]) for n in after)


def test_gradient_clipping(tmp_path):
    """optim.grad_clip scales the gradients the optimizer sees to that norm; the log keeps the norm before."""
    trainer = Trainer(config(tmp_path, steps=3, optim=OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=0.05)),
                      tiny_model(), causal_lm_loss, RandomBatches(4))
    seen = []
    step = trainer.optimizer.step

    def observed_step(*args, **kwargs):
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.optim_params])).item())
        return step(*args, **kwargs)

    trainer.optimizer.step = observed_step
    logged = [h["grad_norm"] for h in trainer.fit().history]
    assert all(n > 0.5 for n in logged)  # well above the limit: clipping had work to do
    assert seen == pytest.approx([0.05] * 3, rel=1e-4)


def test_nonfinite_step_is_skipped_when_configured(tmp_path):
    calls = 0

    def poisoned(model, batch):
        nonlocal calls
        calls += 1
        loss, metrics = causal_lm_loss(model, batch)
        return (loss * float("inf") if calls == 3 else loss), metrics

    trainer = Trainer(config(tmp_path, steps=5, skip_nonfinite=True), tiny_model(), poisoned, RandomBatches(4))
    result = trainer.fit()
    assert result.steps == 5 and result.skipped_steps == 1
    assert [h.get("skipped", 0) for h in result.history] == [0, 0, 1, 0, 0]
    assert all(torch.isfinite(p).all() for p in trainer.inner.parameters())
    assert all(math.isfinite(h["loss"]) for h in result.history if not h.get("skipped"))


def test_precisions_and_activation_checkpointing(tmp_path):
    """Activation checkpointing changes nothing but recomputes each block in backward; bf16 (autocast),
    bf16-pure and fp16 (autocast + grad scaler, on the CPU here) train close to fp32."""
    runs, mlp_calls = {}, {}
    for name, kw in {"fp32": {}, "ckpt": dict(activation_checkpointing=True), "bf16": dict(precision="bf16"),
                     "bf16-pure": dict(precision="bf16-pure"), "fp16": dict(precision="fp16")}.items():
        trainer = Trainer(config(tmp_path / name, steps=4, **kw), tiny_model(), causal_lm_loss, RandomBatches(4))
        calls = mlp_calls[name] = []  # a pre-hook: the recomputation stops once it has what backward needs
        trainer.inner.model.layers[0].mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        runs[name] = (trainer.fit(), trainer)
    assert (len(mlp_calls["fp32"]), len(mlp_calls["ckpt"])) == (4, 8)  # once per step; again in backward
    fp32 = [h["loss"] for h in runs["fp32"][0].history]
    assert [h["loss"] for h in runs["ckpt"][0].history] == pytest.approx(fp32, rel=1e-6)
    for name in ("bf16", "bf16-pure"):
        assert [h["loss"] for h in runs[name][0].history] == pytest.approx(fp32, rel=2e-2)
    assert [h["loss"] for h in runs["fp16"][0].history] == pytest.approx(fp32, rel=5e-3)  # 3 more mantissa bits
    assert [h["loss_scale"] for h in runs["fp16"][0].history] == [2.0**16] * 4  # torch.amp's initial scale
    pure = runs["bf16-pure"][1]
    assert pure.inner.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for _, m in pure.masters)
    assert all(s["exp_avg"].dtype == torch.float32 for s in pure.optimizer.state.values())


def fp16_trainer(run_dir, init_scale: float = 2.0**24, loss=None, **kw) -> Trainer:
    """fp16 with a loss scale so large that the first steps' gradients overflow in fp16."""
    trainer = Trainer(config(run_dir, precision="fp16", **kw), tiny_model(), loss or noisy_loss, RandomBatches(4))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer


def test_fp16_grad_scaler_skips_overflowing_steps(tmp_path):
    """A step whose scaled gradients overflow fp16 leaves the weights alone and halves the scale, without
    stopping the run (the NaN guard is for real non-finite losses); once the scale fits, steps train."""
    initial = params(tiny_model())
    skipped = fp16_trainer(tmp_path / "a", steps=5)
    rows = skipped.fit().history
    assert all(not math.isfinite(r["grad_norm"]) for r in rows)
    assert [r["loss_scale"] for r in rows] == [2.0**k for k in (23, 22, 21, 20, 19)]
    assert all(torch.equal(a, b) for a, b in zip(params(skipped.inner).values(), initial.values()))
    trained = fp16_trainer(tmp_path / "b", steps=6)
    last = trained.fit().history[-1]
    assert math.isfinite(last["grad_norm"]) and last["loss_scale"] == 2.0**19
    assert not all(torch.equal(a, b) for a, b in zip(params(trained.inner).values(), initial.values()))


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    """Steps 1-5 overflow (scale 2^24 -> 2^19); resumed from step 6, the scale must be 2^19 again, or step 7
    would overflow and be skipped, and step 8's loss would differ from the uninterrupted run's."""
    full = fp16_trainer(tmp_path / "full", steps=8, save_every=6).fit()
    calls = 0

    def crashing_loss(model, batch):  # in step 7, after step 6's checkpoint
        nonlocal calls
        calls += 1
        if calls == 7:
            raise Interrupt
        return noisy_loss(model, batch)

    with pytest.raises(Interrupt):
        fp16_trainer(tmp_path / "cut", steps=8, save_every=6, loss=crashing_loss).fit()
    resumed = fp16_trainer(tmp_path / "cut", steps=8, save_every=6, resume="auto").fit()
    assert [h["step"] for h in resumed.history] == [7, 8]
    assert [(h["loss"], h["loss_scale"]) for h in resumed.history] == [
        (h["loss"], h["loss_scale"]) for h in full.history[6:]]


def test_compile_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    eager = Trainer(config(tmp_path / "eager", steps=2), tiny_model(), causal_lm_loss, RandomBatches(4)).fit()
    counters.clear()
    compiled = Trainer(config(tmp_path / "compiled", steps=2, compile=True), tiny_model(), causal_lm_loss,
                       RandomBatches(4)).fit()
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile the blocks
    assert [h["loss"] for h in compiled.history] == pytest.approx([h["loss"] for h in eager.history], rel=1e-4)


def test_weight_decay_groups_and_moe_balancing(tmp_path):
    """No decay on norms, biases and embeddings; MoE adds the aux loss and updates DeepSeek's expert bias."""
    cfg = tiny_config(model_type="deepseek_v3", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      scoring_func="sigmoid", expert_score_bias=True, kv_lora_rank=16, qk_rope_head_dim=8,
                      qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4, attention_bias=False,
                      router_aux_loss_coef=0.01)
    trainer = Trainer(config(tmp_path, steps=3, expert_bias_rate=0.01), build_model(cfg), causal_lm_loss,
                      RandomBatches(4))
    decay, no_decay = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.inner.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] or "embed" in names[id(p)] for p in no_decay["params"])
    assert any("embed_tokens" in names[id(p)] for p in no_decay["params"])
    result = trainer.fit()
    assert all(h["aux_loss"] > 0 and h["loss"] == pytest.approx(h["ce"] + 0.01 * h["aux_loss"])
               for h in result.history)
    bias = trainer.inner.model.layers[0].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # moved by 0.01 per step towards balance


def test_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    Trainer(config(tmp_path, steps=2, tensorboard=True, wandb=True), tiny_model(), causal_lm_loss,
            RandomBatches(4)).fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 2
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
