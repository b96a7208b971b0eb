"""`lmforge grpo` and `lmforge rloo` against TRL itself: each loss type, aggregation and importance-sampling
level equals TRL 1.16's own `GRPOTrainer._compute_loss` (and RLOO's) on the same fixed log-probabilities, in
value and gradient, alone and accumulated over micro-batches; advantages, KL estimators and rewards on
hand-checkable groups; the rollout stream (whole groups, reuse for num_iterations, dynamic sampling, masks,
exact resume of its state); and the commands end to end: resume after a kill, two processes as one."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import tiny_model

from lmforge import cli
from lmforge.checkpoint import load_model, save_model
from lmforge.data.prompts import RLPrompt
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import load_state, save_state
from lmforge.train.policy import (
    aggregate,
    clipped_surrogate,
    group_advantages,
    kl_k1,
    kl_k3,
    leave_one_out_advantages,
    nanstd,
    num_items,
)
from lmforge.train.rewards import exact_answer, format_reward, load_reward_function
from lmforge.train.rollout import RewardSet, Rollouts, RolloutSettings

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]


# -- the loss against TRL's own code ---------------------------------------------------------------------------

class _Accelerator:  # one process: TRL's reductions are the identity
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x


def trl_loss(trainer_cls, logps, inputs, grad_accum=1, steps_per_generation=1, **settings):
    """TRL's `_compute_loss` of `trainer_cls` on fixed per-token log-probabilities (its model call replaced)."""
    base = dict(aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                importance_sampling_level="token", beta=0.0, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2,
                use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=grad_accum,
                max_completion_length=6, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
                _metrics={"train": defaultdict(list)}, vllm_importance_sampling_correction=False,
                args=SimpleNamespace(use_bias_correction_kl=False, delta=settings.pop("delta", None),
                                     steps_per_generation=steps_per_generation),
                _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    B, T = logps.shape
    full = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
            "completion_ids": torch.zeros(B, T, dtype=torch.long), **inputs}
    return trainer_cls._compute_loss(SimpleNamespace(**{**base, **settings}), None, full)


def fixed_batch(seed: int, rows: int = 4, width: int = 6):
    """Per-token log-probs (a leaf), old ones off by up to ±0.5 (so both clip sides are hit), reference
    ones, completions of different lengths, advantages of both signs and a zero."""
    g = torch.Generator().manual_seed(seed)
    logps = (-3 * torch.rand(rows, width, generator=g)).requires_grad_()
    old = logps.detach() + (torch.rand(rows, width, generator=g) - 0.5)
    ref = logps.detach() + 0.3 * torch.randn(rows, width, generator=g)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).long()
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.7, 2.0][:rows])
    return logps, old, ref, mask, advantages


def our_loss(logps, old, ref, mask, advantages, loss_type, level, beta, eps_low, eps_high, delta=None):
    per_token, _ = clipped_surrogate(logps, old, advantages, mask.float(), eps_low, eps_high, level, delta)
    if beta:
        per_token = per_token + beta * kl_k3(logps, ref)
    return aggregate(per_token, mask.float(), loss_type, 6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level, beta, eps_high, delta", [("token", 0.0, 0.2, None), ("token", 0.04, 0.28, None),
                                                          ("sequence", 0.0, 0.28, None), ("token", 0.0, 0.2, 1.3)])
def test_grpo_loss_equals_trls_in_value_and_gradient(loss_type, level, beta, eps_high, delta):
    from trl import GRPOTrainer

    logps, old, ref, mask, advantages = fixed_batch(0)
    theirs = trl_loss(GRPOTrainer, logps, {"completion_mask": mask, "advantages": advantages,
                                           "old_per_token_logps": old, "ref_per_token_logps": ref,
                                           "num_items_in_batch": mask.sum()},
                      loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_high=eps_high,
                      delta=delta)
    (grad_theirs,) = torch.autograd.grad(theirs, logps)
    ours = our_loss(logps, old, ref, mask, advantages, loss_type, level, beta, 0.2, eps_high, delta)
    (grad_ours,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-6, atol=1e-7)
    assert grad_ours.abs().sum() > 0


@pytest.mark.parametrize("flags", [["--loss-type", "grpo", "--importance-sampling-level", "sequence"],
                                   ["--loss-type", "dr_grpo", "--beta", "0.04", "--epsilon-high", "0.28"],
                                   ["--loss-type", "bnpo", "--delta", "1.15", "--epsilon", "0.1"]])
def test_the_commands_options_reach_the_loss(flags, monkeypatch):
    """grpo_loss, as `lmforge grpo` calls it with parsed options, equals TRL's loss under the same settings."""
    from trl import GRPOTrainer

    from lmforge.settings import parse_args_or_raise
    from lmforge.train import grpo

    cfg = parse_args_or_raise(grpo.GRPOConfig, [*flags, "--max-completion-length", "6"])
    logps, old, ref, mask, advantages = fixed_batch(4)
    monkeypatch.setattr(grpo, "token_logps", lambda *a, **k: (logps, torch.zeros_like(logps), None))
    monkeypatch.setattr(grpo, "with_router_aux_loss", lambda loss, output, model, metrics: loss)
    batch = {"input_ids": torch.zeros_like(mask), "completion_mask": mask.float(), "advantages": advantages,
             "old_logps": old, "ref_logps": ref, "metrics": {"reward": 0.5}}
    ours, metrics = grpo.grpo_loss(None, batch, cfg)
    theirs = trl_loss(GRPOTrainer, logps, {"completion_mask": mask, "advantages": advantages,
                                           "old_per_token_logps": old, "ref_per_token_logps": ref,
                                           "num_items_in_batch": mask.sum()},
                      loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
                      beta=cfg.beta, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_upper, delta=cfg.delta,
                      max_completion_length=6)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert metrics["reward"] == 0.5 and ("kl" in metrics) == (cfg.beta > 0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_reaches_the_advantages(scale):
    from lmforge.settings import parse_args_or_raise
    from lmforge.train import grpo

    cfg = parse_args_or_raise(grpo.GRPOConfig, ["--scale-rewards", scale, "--num-generations", "4"])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    ours, _ = grpo.grpo_advantages(cfg)(rewards, {})
    torch.testing.assert_close(ours, group_advantages(rewards, 4, scale)[0])
    assert len({tuple(group_advantages(rewards, 4, s)[0].tolist()) for s in ("group", "batch", "none")}) == 3


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_weighed_by_num_items_give_trls_accumulated_loss(loss_type):
    """Two micro-batches of unequal token counts: the Trainer's weights (num_items / their sum) on our
    losses give what TRL's accumulation gives (its losses summed, each normalised as it does over 2 steps)."""
    from trl import GRPOTrainer

    parts = [fixed_batch(1, rows=3), fixed_batch(2, rows=3)]
    total_tokens = sum(p[3].sum() for p in parts)
    theirs = sum(trl_loss(GRPOTrainer, logps, {"completion_mask": mask, "advantages": adv,
                                               "old_per_token_logps": old, "num_items_in_batch": total_tokens},
                          grad_accum=2, steps_per_generation=2, loss_type=loss_type)
                 for logps, old, _, mask, adv in parts)
    items = torch.stack([num_items(loss_type, p[3].float()) for p in parts])
    weights = items / items.sum()
    ours = sum(w * our_loss(logps, old, None, mask, adv, loss_type, "token", 0.0, 0.2, 0.2)
               for w, (logps, old, _, mask, adv) in zip(weights, parts))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_rloo_loss_equals_trls():
    from trl import RLOOTrainer

    from lmforge.settings import parse_args_or_raise
    from lmforge.train import rloo

    logps, old, _, mask, advantages = fixed_batch(3)
    old_sums = (old * mask).sum(1) + torch.tensor([0.0, 0.3, -0.3, 0.05])  # ratios clipped on both sides
    theirs = RLOOTrainer._compute_loss(SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, epsilon_low=0.2, epsilon_high=0.28, model=SimpleNamespace(training=True),
        accelerator=_Accelerator(), _metrics={"train": defaultdict(list)}), None, {
        "prompt_ids": torch.zeros(4, 1, dtype=torch.long), "prompt_mask": torch.ones(4, 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "old_logps": old_sums,
        "advantages": advantages})
    cfg = parse_args_or_raise(rloo.RLOOConfig, ["--epsilon-high", "0.28"])
    # our old log-probs are per token; put the sums' difference on each row's first token
    old_tokens = old * mask
    old_tokens[:, 0] += old_sums - old_tokens.sum(1)
    batch = {"input_ids": torch.zeros_like(mask), "completion_mask": mask.float(), "old_logps": old_tokens,
             "advantages": advantages}
    model = SimpleNamespace()
    original = rloo.token_logps
    rloo.token_logps = lambda *a, **k: (logps, torch.zeros_like(logps), SimpleNamespace(aux_loss=None))
    rloo.with_router_aux_loss = lambda loss, output, model, metrics: loss
    try:
        ours, metrics = rloo.rloo_loss(model, batch, cfg)
    finally:
        rloo.token_logps = original
        from lmforge.train.objectives import with_router_aux_loss
        rloo.with_router_aux_loss = with_router_aux_loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert 0 < metrics["clip_ratio/region_mean"] < 1


# -- advantages, KL, rewards -----------------------------------------------------------------------------------

def test_group_advantages_on_hand_checkable_groups():
    from trl.trainer.utils import nanstd as trl_nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, float("nan"), 1.0, 0.0, 1.0])
    torch.testing.assert_close(nanstd(rewards.view(3, 4), dim=1), trl_nanstd(rewards.view(3, 4), dim=1))
    advantages, zero_std = group_advantages(rewards, 4, "group")
    std1 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # Bessel: n - 1
    std3 = math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2)
    expected = [0.75 / (std1 + 1e-4)] + [-0.25 / (std1 + 1e-4)] * 3 + [0.0] * 4 + \
        [0.0, (1 / 3) / (std3 + 1e-4), (-2 / 3) / (std3 + 1e-4), (1 / 3) / (std3 + 1e-4)]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    assert zero_std.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    unscaled, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO
    torch.testing.assert_close(unscaled, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, 0, 1 / 3, -2 / 3, 1 / 3]))
    batch, _ = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch, unscaled / (trl_nanstd(rewards) + 1e-4))


def test_leave_one_out_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, float("nan"), 1.0, 0.0, 1.0, 2.0, float("nan")])
    out = leave_one_out_advantages(rewards[:8], 4)
    torch.testing.assert_close(out, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.5, -1.0, 0.5]))
    # a pair with one unscorable sample: no baseline for the other, so no signal
    assert leave_one_out_advantages(rewards[8:], 2).tolist() == [0.0, 0.0]


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-2.0, -2.0, -0.1])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([1.0, 0.0, -0.4]))
    expected = [math.exp(d) - d - 1 for d in (-1.0, 0.0, 0.4)]
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor(expected))
    assert (kl_k3(logp, ref) >= 0).all()


def test_built_in_rewards():
    from trl.rewards import get_soft_overlong_punishment

    texts = ["So 3 + 4 = 7.\n#### 7", "<think>3+4</think><answer> 7 </answer>", "#### 8", "7", "<answer>x</answer>"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    assert exact_answer([[]] * 5, completions, answer=["7", "7", "7", "7", "x"]) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert format_reward([[]] * 5, completions) == [1.0, 1.0, 1.0, 0.0, 1.0]
    length = load_reward_function("length", max_completion_length=20)
    ids = [[0] * n for n in (3, 15, 16, 18, 20, 21)]
    theirs = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=5)(completion_ids=ids)
    assert length([[]] * 6, [[]] * 6, completion_ids=ids) == pytest.approx(theirs)
    assert theirs[0] == 0.0 and theirs[-1] == -1.0


def test_reward_set_weighs_and_logs_each_function():
    rewards = RewardSet(["exact_answer", "format"], [1.0, 0.5], 16)
    total, per_function = rewards([[]] * 3, ["#### 7", "#### 8", "7"], [[1], [2], [3]], {"answer": ["7"] * 3})
    assert total.tolist() == [1.5, 0.5, 0.0] and per_function.tolist() == [[1, 1], [0, 1], [0, 0]]
    metrics = rewards.metrics(total, per_function)
    assert metrics["rewards/format/mean"] == pytest.approx(2 / 3) and metrics["reward"] == pytest.approx(2 / 3)
    rewards.functions[1] = lambda prompts, completions, **kw: [None, 1.0, None]  # declines to score two
    total, _ = rewards([[]] * 3, ["#### 7", "#### 8", "7"], [[1], [2], [3]], {"answer": ["7"] * 3})
    assert total.tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="reward_weights: 1 weights for 2 reward functions"):
        RewardSet(["exact_answer", "format"], [1.0], 16)


# -- the rollout stream ----------------------------------------------------------------------------------------

def rollouts(corpus, *, reward, num_iterations=1, dynamic=False, mask_truncated=False, grad_accum=2, prompts=3,
             seed=0):
    tokenizer = Tokenizer.from_dir(corpus[0])
    model = tiny_model(seed=4, vocab_size=300, max_position_embeddings=128)
    items = [RLPrompt([{"role": "user", "content": f"{a}+{a}"}], str(2 * a)) for a in range(prompts)]
    rewards = RewardSet(["format"], None, 8)
    rewards.functions, rewards.names = [reward], ["test"]
    settings = RolloutSettings(num_generations=2, batch_size=2, grad_accum=grad_accum, num_iterations=num_iterations,
                               max_completion_length=8, sampling=SamplingParams(temperature=1.0), seed=seed,
                               chunk_size=64, mask_truncated_completions=mask_truncated, dynamic_sampling=dynamic,
                               old_logps=num_iterations > 1)

    def advantages(values, batch):
        return group_advantages(values, 2)[0], {}

    env = SimpleNamespace(rank=0, world_size=1)
    return Rollouts(items, tokenizer, model, None, rewards, advantages, settings, env, 32, "dapo"), model


def by_length(prompts, completions, completion_ids, **columns):
    return [float(len(ids)) for ids in completion_ids]


def test_micro_batches_hold_whole_groups_with_completion_masks(corpus):
    stream, model = rollouts(corpus, reward=by_length)
    first = [next(stream) for _ in range(2)]  # one step: grad_accum micro-batches of batch_size samples
    assert stream.generations == 1
    for batch in first:
        mask = batch["completion_mask"]
        assert batch["input_ids"].shape == mask.shape and mask.shape[0] == 2
        lengths = mask.sum(1)
        # a group's two samples: advantages of opposite signs (or both 0), the reward their lengths
        assert batch["advantages"].sum().abs() < 1e-5
        assert batch["num_items"] == lengths.sum()
        assert batch["metrics"]["completions/mean_length"] > 0
    next(stream)
    assert stream.generations == 2  # the next step draws the next prompts


def test_num_iterations_reuse_a_generation_and_the_state_restores_mid_way(corpus, tmp_path):
    stream, _ = rollouts(corpus, reward=by_length, num_iterations=2)
    step1 = [next(stream) for _ in range(2)]
    step2 = [next(stream) for _ in range(2)]
    for a, b in zip(step1, step2):  # the same completions, trained on again
        assert torch.equal(a["input_ids"], b["input_ids"]) and "old_logps" in a
    next(stream)  # mid-way through the next generation's first step
    save_state(stream.state_dict(), tmp_path, "rank0")
    expected = [next(stream) for _ in range(5)]
    restored, _ = rollouts(corpus, reward=by_length, num_iterations=2)
    restored.load_state_dict(load_state(tmp_path, "rank0"))
    for a, b in zip(expected, [next(restored) for _ in range(5)]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_dynamic_sampling_drops_groups_without_a_spread(corpus):
    flat = {"0+0"}  # the group of this prompt gets equal rewards

    def reward(prompts, completions, completion_ids, **columns):
        return [0.0 if p[-1]["content"] in flat else float(len(ids)) for p, ids in zip(prompts, completion_ids)]

    stream, _ = rollouts(corpus, reward=reward, dynamic=True, prompts=4)
    step = [next(stream) for _ in range(2)]
    assert step[0]["metrics"]["sampling/rounds"] >= 2  # a draw of 2 prompts that had 0+0 needed another
    prompts = [stream.tokenizer.decode(row.tolist()) for b in step for row in b["input_ids"]]
    assert not any("0+0" in p for p in prompts)


def test_a_short_dynamic_step_splits_its_samples_without_overlap(corpus):
    """Only one prompt of three has answers that differ: a step keeps its one group (2 samples, fewer than the
    4 asked for), split over the 2 micro-batches, none repeated."""
    seen = []  # the group of 1+1 differs the first time it is drawn only

    def reward(prompts, completions, completion_ids, **columns):
        first = "1+1" not in seen
        seen.extend(p[-1]["content"] for p in prompts)
        return [float(sum(ids) % 97) if first and p[-1]["content"] == "1+1" else 0.0
                for p, ids in zip(prompts, completion_ids)]

    stream, _ = rollouts(corpus, reward=reward, dynamic=True, prompts=3)
    step = [next(stream) for _ in range(2)]
    rows = [tuple(row.tolist()) for b in step for row in b["input_ids"]]
    assert len(rows) == 2 and len(set(rows)) == 2
    assert all("1+1" in stream.tokenizer.decode(list(r)) for r in rows)
    assert sum(float(b["num_items"]) for b in step) == sum(float(b["completion_mask"].sum()) for b in step)


def test_truncated_completions_can_be_left_out(corpus):
    stream, _ = rollouts(corpus, reward=by_length, mask_truncated=True)
    batches = [next(stream) for _ in range(2)]
    truncated = sum(int(b["completion_mask"].sum(1).eq(0).sum()) for b in batches)
    assert truncated > 0  # a random tiny model rarely ends within 8 tokens


# -- the commands ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy_dir(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo") / "policy"
    save_model(tiny_model(seed=7, vocab_size=300, max_position_embeddings=128), path, tokenizer_dir=corpus[0])
    return path


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    """A user's reward function (module:function) that varies with the completion even for a random model."""
    directory = tmp_path_factory.mktemp("rewards")
    (directory / "rl_rewards.py").write_text(
        "def variety(prompts, completions, completion_ids, **columns):\n"
        "    return [len(set(ids)) / max(len(ids), 1) for ids in completion_ids]\n")
    return directory


def rl_args(command, policy_dir, tasks, reward_module, run_dir, *extra):
    return [command, "--model", str(policy_dir), "--prompts", str(tasks / "prompts.jsonl"), "--val-prompts",
            str(tasks / "test.jsonl"), "--max-val-prompts", "4", "--reward-funcs", "rl_rewards:variety",
            "exact_answer", "--reward-weights", "1", "0.5", "--num-generations", "4", "--batch-size", "4",
            "--max-completion-length", "10", "--train.steps", "4", "--train.optim.lr", "1e-3",
            "--train.save-every", "1", "--train.keep-last", "2", "--train.eval-every", "2",
            "--train.run-dir", str(run_dir), *QUIET, *extra]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("command, extra", [
    ("grpo", ["--beta", "0.04", "--num-iterations", "2", "--train.grad-accum", "2"]),
    ("rloo", ["--normalize-advantages", "true"]),
])
def test_a_resumed_run_reproduces_the_uninterrupted_one(policy_dir, tasks, reward_module, tmp_path, monkeypatch,
                                                        command, extra):
    monkeypatch.chdir(reward_module)
    assert cli.main(rl_args(command, policy_dir, tasks, reward_module, tmp_path / "full", *extra)) == 0
    rows = metrics(tmp_path / "full")
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 4 and all(math.isfinite(r["loss"]) for r in trained)
    assert {"reward", "rewards/variety/mean", "rewards/exact_answer/mean", "entropy", "clip_ratio/region_mean",
            "completions/mean_length", "frac_reward_zero_std", "kl"} <= trained[0].keys()
    assert [r["step"] for r in rows if "val_accuracy" in r] == [2, 4]
    assert (tmp_path / "full" / "reward.png").is_file() and (tmp_path / "full" / "accuracy.png").is_file()
    # killed after step 3's checkpoint (mid-way through GRPO's second generation, trained on twice): the
    # resumed run trains step 4 as the uninterrupted one did
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-000003", tmp_path / "cut" / "checkpoint-000003")
    args = rl_args(command, policy_dir, tasks, reward_module, tmp_path / "cut", *extra, "--train.resume", "auto")
    assert cli.main(args) == 0
    resumed = [r for r in metrics(tmp_path / "cut") if "loss" in r]
    assert [r["step"] for r in resumed] == [4]
    assert {k: v for k, v in resumed[0].items() if k != "tokens_per_s"} == \
        {k: v for k, v in trained[3].items() if k != "tokens_per_s"}
    full, cut = load_model(tmp_path / "full" / "final"), load_model(tmp_path / "cut" / "final")
    for (name, p), q in zip(full.state_dict().items(), cut.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(full.state_dict().values(),
                                                     load_model(policy_dir).state_dict().values()))


def test_two_processes_train_as_one_with_the_same_global_batch(policy_dir, tasks, reward_module, tmp_path):
    """2 processes of 4 completions (one group each) equal 1 process of 8: groups are never split."""
    common = ["--train.steps", "3", "--train.save-every", "0", "--train.eval-every", "0", "--val-prompts"]
    single = rl_args("grpo", policy_dir, tasks, reward_module, tmp_path / "one", "--batch-size", "8", *common)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), str(reward_module)])}
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", *single], env=env, capture_output=True, text=True,
                          timeout=300, cwd=reward_module)
    assert done.returncode == 0, done.stderr[-3000:]
    two = rl_args("grpo", policy_dir, tasks, reward_module, tmp_path / "two", *common)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "lmforge.cli", *two], env=env, capture_output=True, text=True, timeout=300,
                          cwd=reward_module)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = ([r for r in metrics(tmp_path / run) if "loss" in r] for run in ("one", "two"))
    assert len(one) == 3
    for key in ("loss", "grad_norm", "reward", "entropy"):
        torch.testing.assert_close([r[key] for r in two], [r[key] for r in one], rtol=1e-4, atol=1e-6)


def test_bad_options_are_named(policy_dir, tasks, reward_module, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(reward_module)
    assert cli.main(rl_args("grpo", policy_dir, tasks, reward_module, tmp_path, "--batch-size", "6")) == 1
    assert "batch_size * grad_accum (6 * 1) is not a multiple of num_generations (4)" in capsys.readouterr().err
    assert cli.main(rl_args("grpo", policy_dir, tasks, reward_module, tmp_path, "--reward-weights", "1")) == 1
    assert "reward_weights: 1 weights for 2 reward functions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(rl_args("grpo", policy_dir, tasks, reward_module, tmp_path, "--loss-type", "ppo"))
    assert "loss_type" in capsys.readouterr().err
    assert cli.main(rl_args("rloo", policy_dir, tasks, reward_module, tmp_path, "--reward-clip-range", "1", "0")) == 1
    assert "reward_clip_range: [1.0, 0.0] is not LOW HIGH" in capsys.readouterr().err
