"""`lmforge ppo`: GAE, whitening, the clipped value loss and the KL estimators on numbers worked out by hand;
the per-token rewards and advantages of a rollout; the loss's wiring (policy and value model as one module);
one step end to end with a reward model as the reward, its value model loaded by transformers'
AutoModelForSequenceClassification with our values; exact resume after a kill; bad options named.
(TRL 1.16 as installed has no PPOTrainer, nor masked_whiten, so the references here are hand computations.)"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_config, tiny_model

from lmforge import cli
from lmforge.checkpoint import load_model, load_reward_model, save_model
from lmforge.model import build_model
from lmforge.model.reward import RewardModel
from lmforge.settings import OptionError, parse_args_or_raise
from lmforge.train import ppo
from lmforge.train.policy import clipped_value_loss, gae, kl_k1, kl_k3, whiten

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]


# -- the pieces, by hand ---------------------------------------------------------------------------------------

def test_gae_by_hand_with_a_prompt_and_padding():
    # row 0: a prompt token, then 3 completion tokens; row 1: a prompt token, 2 completion tokens, padding
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
    rewards = torch.tensor([[0.0, 0.5, -0.1, 1.0], [0.0, 0.3, 2.0, 5.0]])
    values = torch.tensor([[9.0, 0.2, 0.4, 0.6], [7.0, 0.1, -0.5, 3.0]])  # 9, 7, 3: outside the completions
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_t = r_t + 0.9 V_{t+1} - V_t (V after the last token 0); A_t = delta_t + 0.72 A_{t+1}
    # row 0: A3 = 1 - 0.6 = 0.4; A2 = (-0.1 + 0.54 - 0.4) + 0.72 * 0.4 = 0.328; A1 = 0.66 + 0.72 * 0.328 = 0.89616
    # row 1: A2 = 2 + 0.5 = 2.5; A1 = (0.3 - 0.45 - 0.1) + 0.72 * 2.5 = 1.55
    expected = torch.tensor([[0.0, 0.89616, 0.328, 0.4], [0.0, 1.55, 2.5, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[0.0, 1.09616, 0.728, 1.0], [0.0, 1.65, 2.0, 0.0]]))

    def textbook(r, v, gamma, lam):  # the recursion on one completion alone (no mask), as TRL's loop runs it
        out, last = [], 0.0
        for t in reversed(range(len(r))):
            nxt = v[t + 1] if t + 1 < len(r) else 0.0
            last = r[t] + gamma * nxt - v[t] + gamma * lam * last
            out.append(last)
        return out[::-1]

    for row, length in ((0, 3), (1, 2)):
        reference = textbook(rewards[row, 1:1 + length].tolist(), values[row, 1:1 + length].tolist(), 0.9, 0.8)
        torch.testing.assert_close(advantages[row, 1:1 + length], torch.tensor(reference))


def test_whiten_over_the_masked_entries():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, var = kept.mean(), kept.var()  # unbiased, as TRL's masked_var: 5/3
    whitened = whiten(values, mask)
    torch.testing.assert_close(whitened[mask.bool()], (kept - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(whiten(values, mask, shift_mean=False)[mask.bool()],
                               (kept - mean) / torch.sqrt(var + 1e-8) + mean)
    assert whitened[mask.bool()].mean().abs() < 1e-6 and whitened[mask.bool()].std().item() == pytest.approx(1.0)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.5, 0.85, 1.5, 40.0]])
    old = torch.tensor([[0.8, 0.8, 0.8, 0.8, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0, 0.0, -40.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, clip=0.1)
    # 1.0 -> 0.9: max((1 - 2)^2, (0.9 - 2)^2) = 1.21 (the clipped one); 0.5 -> 0.7: max(0.25, 0.49) = 0.49
    # (clipped); 0.85 stays: 0.7225 both; 1.5 -> 0.9: max(2.25, 0.81) = 2.25 (the unclipped one)
    assert loss.item() == pytest.approx(0.5 * (1.21 + 0.49 + 0.7225 + 2.25) / 4)
    assert clipfrac.item() == pytest.approx(0.5)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(0.5) * -1 - 1)  # e^d - d - 1, d = log 1/2
    # both unbiased for KL(p || q) under samples of p; k3 never negative
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logps, refs = p.log()[samples], q.log()[samples]
    kl = (p * (p / q).log()).sum().item()
    assert kl_k1(logps, refs).mean().item() == pytest.approx(kl, abs=0.01)
    assert kl_k3(logps, refs).mean().item() == pytest.approx(kl, abs=0.01)
    assert (kl_k3(logps, refs) >= 0).all() and (kl_k1(logps, refs) < 0).any()


def test_token_rewards_put_the_score_at_the_last_completion_token():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    kl = torch.full((3, 5), 2.0)
    rewards, non_score = ppo.token_rewards(torch.tensor([1.0, -3.0, 7.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(non_score, -0.2 * mask)
    torch.testing.assert_close(rewards, torch.tensor([[0, -0.2, -0.2, 0.8, 0], [0, 0, -3.2, 0, 0], [0.0] * 5]))


# -- the stage's rollouts and loss on tiny models ----------------------------------------------------------------

def tiny_pair(seed: int = 0):
    policy = tiny_model(seed=seed)
    value = build_model(tiny_config(num_labels=1, pad_token_id=0), seed=seed + 1, model_class=RewardModel)
    return policy, value


def rollout_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (4, 7), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]],
                        dtype=torch.float32)
    old = -3 * torch.rand(4, 7, generator=g) * mask
    ref = (old + 0.2 * torch.randn(4, 7, generator=g)) * mask
    return {"input_ids": ids, "completion_mask": mask, "old_logps": old, "ref_logps": ref,
            "truncated": torch.tensor([True, False, False, True])}


def test_advantages_of_a_rollout():
    _, value = tiny_pair()
    cfg = parse_args_or_raise(ppo.PPOConfig, ["--kl-coef", "0.1", "--kl-estimator", "k3", "--missing-eos-penalty",
                                              "1.5", "--lam", "0.9", "--batch-size", "3"])
    batch = rollout_batch()
    scores = torch.tensor([1.0, 2.0, float("nan"), -1.0])
    advantages, metrics = ppo.ppo_advantages(cfg, value)(scores, batch)
    mask = batch["completion_mask"]
    values = ppo.rollout_values(value, batch["input_ids"], 4) * mask
    torch.testing.assert_close(batch["values"], values)  # the values when sampled, in batches of any size
    kl = kl_k3(batch["old_logps"], batch["ref_logps"]) * mask
    penalised = torch.tensor([1.0 - 1.5, 2.0, 0.0, -1.0 - 1.5])  # NaN: 0; no EOS: - 1.5
    rewards, _ = ppo.token_rewards(penalised, kl, mask, 0.1)
    raw, returns = gae(rewards, values, mask, 1.0, 0.9)
    torch.testing.assert_close(batch["returns"], returns)
    torch.testing.assert_close(advantages, whiten(raw, mask) * mask)
    assert advantages[mask.bool()].mean().abs() < 1e-6 and (advantages[~mask.bool()] == 0).all()
    assert metrics["objective/scores"] == pytest.approx(penalised.mean().item())
    assert metrics["objective/kl"] == pytest.approx(kl.sum(-1).mean().item(), rel=1e-5)
    assert metrics["objective/rlhf_reward"] == pytest.approx(penalised.mean().item() - 0.1 * kl.sum(-1).mean().item(),
                                                             rel=1e-5)


def test_the_loss_trains_the_policy_and_the_value_model_together():
    """On-policy (old log-probs = the policy's) and V_old = V: the ratio is 1 and no value is clipped, so the
    loss is -mean(A) + vf_coef * 0.5 * mean((V - R)^2) over the completion tokens, and both models get gradients."""
    policy, value = tiny_pair()
    model = ppo.PolicyAndValue(policy, value)
    cfg = parse_args_or_raise(ppo.PPOConfig, ["--vf-coef", "0.3", "--temperature", "0.7"])
    batch = rollout_batch(1)
    mask = batch["completion_mask"]
    with torch.no_grad():
        output = model(batch["input_ids"], return_hidden=True)
        from lmforge.train.objectives import token_logps

        logps = token_logps(policy, batch["input_ids"], batch["input_ids"].masked_fill(mask == 0, -100),
                            cfg.chunk_size, 0.7)[0]
    advantages = torch.randn(4, 7, generator=torch.Generator().manual_seed(3)) * mask
    returns = torch.randn(4, 7, generator=torch.Generator().manual_seed(4)) * mask
    batch.update(old_logps=logps, values=output.values * mask, returns=returns, advantages=advantages)
    loss, metrics = ppo.ppo_loss(model, batch, cfg)
    expected = -(advantages * mask).sum() / mask.sum() + 0.3 * 0.5 * (((output.values - returns) ** 2) * mask).sum() \
        / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["val/ratio"].item() == pytest.approx(1.0) and metrics["policy/clipfrac_avg"].item() == 0
    loss.backward()
    assert policy.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert value.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0 and value.score.weight.grad.abs().sum() > 0


# -- the command ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_dir(corpus, tmp_path_factory):
    """A reward model (random, tiny) as the reward: RLHF's setting."""
    path = tmp_path_factory.mktemp("ppo") / "reward"
    cfg = tiny_config(vocab_size=300, max_position_embeddings=128, num_labels=1, pad_token_id=0)
    save_model(build_model(cfg, seed=11, model_class=RewardModel), path, tokenizer_dir=corpus[0])
    return path


def ppo_args(base_model, tasks, reward_dir, run_dir, *extra):
    return ["ppo", "--model", str(base_model), "--prompts", str(tasks / "prompts.jsonl"), "--reward-funcs",
            str(reward_dir), "--batch-size", "4", "--max-prompt-length", "64", "--response-length", "10",
            "--num-ppo-epochs", "2", "--missing-eos-penalty", "1.0", "--train.steps", "4", "--train.optim.lr", "1e-3",
            "--train.save-every", "3", "--train.eval-every", "0", "--train.run-dir", str(run_dir), *QUIET, *extra]


def rows(run_dir) -> list[dict]:
    return [row for row in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_a_run_saves_the_policy_and_a_value_model_transformers_loads(base_model, tasks, reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    # min-lr-ratio 1: the schedule's last step would otherwise have lr 0 (its floor)
    args = ppo_args(base_model, tasks, reward_dir, tmp_path / "run", "--train.steps", "1", "--train.optim.min-lr-ratio",
                    "1", "--val-prompts", str(tasks / "test.jsonl"), "--max-val-prompts", "2")
    assert cli.main(args) == 0
    (row,) = rows(tmp_path / "run")
    assert math.isfinite(row["loss"])
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                "val/clipfrac_avg", "val/ratio", "reward"):
        assert key in row and math.isfinite(row[key]), key
    assert row["objective/kl"] == 0 and row["val/ratio"] == pytest.approx(1.0)  # the first step is on-policy
    final = tmp_path / "run" / "final"
    assert (tmp_path / "run" / "reward.png").is_file()
    assert "val_accuracy" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    policy = load_model(final)  # the policy: a causal LM directory (`lmforge generate` loads it)
    assert policy.config.num_labels is None and not (final / "value_model" / "generation_config.json").exists()
    before = load_reward_model(base_model, seed=0)  # the starting value model: the policy's body, a new head
    ours = load_reward_model(final / "value_model")
    assert not torch.equal(ours.score.weight, before.score.weight)  # trained
    assert not torch.equal(ours.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
    hf = AutoModelForSequenceClassification.from_pretrained(final / "value_model", dtype=torch.float32).eval()
    assert hf.config.num_labels == 1
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.score(hf.model(ids).last_hidden_state).squeeze(-1)  # TRL's get_reward reads values so
        values, _ = ppo.token_values(ours, ids)
        torch.testing.assert_close(values[:, 1:], theirs[:, :-1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(ids).rewards, hf(ids).logits.squeeze(-1), rtol=1e-4, atol=1e-5)


def test_a_resumed_run_reproduces_the_uninterrupted_one(base_model, tasks, reward_dir, tmp_path):
    """Killed after step 3 (mid-rollout: the second rollout's micro-batches, values and returns are in the
    checkpoint) and resumed: step 4 and the final weights of both models are the uninterrupted run's."""
    extra = ["--train.grad-accum", "2", "--batch-size", "2", "--kl-estimator", "k3", "--whiten-rewards", "true"]
    assert cli.main(ppo_args(base_model, tasks, reward_dir, tmp_path / "full", *extra)) == 0
    full = rows(tmp_path / "full")
    assert full[1]["objective/kl"] == 0 and full[2]["objective/kl"] != 0  # the second rollout is off the reference
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-000003", tmp_path / "cut" / "checkpoint-000003")
    assert cli.main(ppo_args(base_model, tasks, reward_dir, tmp_path / "cut", *extra, "--resume", "auto")) == 0
    resumed = rows(tmp_path / "cut")
    keys = [k for k in full[0] if k.startswith(("loss", "grad_norm", "objective/", "policy/", "val/", "reward"))]
    assert len(resumed) == 1 and len(keys) > 12
    assert {k: resumed[0][k] for k in keys} == {k: full[3][k] for k in keys}
    for weights in ("model.safetensors", "value_model/model.safetensors"):
        a, b = load_file(tmp_path / "full" / "final" / weights), load_file(tmp_path / "cut" / "final" / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights


def test_options_have_trl_names_and_bad_ones_are_named(base_model, tasks, reward_dir, tmp_path, capsys):
    cfg = parse_args_or_raise(ppo.PPOConfig, [])
    assert (cfg.num_iterations, cfg.beta, cfg.kl_estimator, cfg.epsilon, cfg.vf_coef, cfg.cliprange_value, cfg.gamma,
            cfg.lam, cfg.whiten_rewards, cfg.temperature, cfg.missing_eos_penalty, cfg.train.optim.lr) == \
        (4, 0.05, "k1", 0.2, 0.1, 0.2, 1.0, 0.95, False, 0.7, None, 3e-6)
    cfg = parse_args_or_raise(ppo.PPOConfig, ["--kl-coef", "0.2", "--cliprange", "0.1", "--num-ppo-epochs", "2"])
    assert (cfg.beta, cfg.epsilon, cfg.num_iterations) == (0.2, 0.1, 2)
    with pytest.raises(OptionError, match="kl_estimator"):
        parse_args_or_raise(ppo.PPOConfig, ["--kl-estimator", "k2"])
    cfg.kl_estimator = "k2"
    with pytest.raises(ValueError, match="kl_estimator: 'k2'"):
        ppo.validate(cfg)
    with pytest.raises(OptionError, match="lam"):
        ppo.validate(parse_args_or_raise(ppo.PPOConfig, ["--lam", "1.5"]))
    assert cli.main(ppo_args(base_model, tasks, reward_dir, tmp_path, "--train.activation-checkpointing",
                             "true")) == 1
    assert "train.activation_checkpointing" in capsys.readouterr().err
    small = tmp_path / "small_vocab"
    save_model(build_model(tiny_config(num_labels=1, pad_token_id=0), seed=0, model_class=RewardModel), small)
    assert cli.main(ppo_args(base_model, tasks, reward_dir, tmp_path, "--value-model", str(small))) == 1
    assert "value_model" in capsys.readouterr().err
