"""`lmforge distill` against TRL's GKD: the generalised JSD equals TRL's `generalized_jsd_loss` on the same logits
(every beta, temperatures), and so does the whole chunked loss of two real models, in value and gradient; the
loss against its formulas on hand-checkable numbers (each KL's direction, T², alpha, masked tokens); the
teacher's tokenizer check; on-policy completions sampled from the student's current weights; the seeded,
resumable choice of on-policy batches; exact resume; distillation on shards with alpha 1 is pretraining."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import tiny_model

from lmforge import cli
from lmforge.checkpoint import save_model
from lmforge.data.sft import SFTSample
from lmforge.infer.engine import Engine, SamplingParams
from lmforge.settings import parse_args_or_raise
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train import distill, pretrain
from lmforge.train.objectives import distillation_loss, generalized_jsd
from lmforge.train.rollout import Sampler

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]


@pytest.fixture(scope="module")
def gkd():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer


def model_dir(directory: Path, tokenizer, seed: int, **overrides) -> Path:
    save_model(tiny_model(seed=seed, **{"vocab_size": 300, "max_position_embeddings": 256, **overrides}),
               directory, tokenizer_dir=tokenizer)
    return directory


@pytest.fixture(scope="module")
def teacher_dir(corpus, tmp_path_factory):
    """Wider and deeper than the student: only the vocabulary must match."""
    return model_dir(tmp_path_factory.mktemp("distill") / "teacher", corpus[0], seed=4, hidden_size=48,
                     num_hidden_layers=3, tie_word_embeddings=False)


# -- the loss ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trls_in_value_and_gradient(gkd, beta, temperature):
    torch.manual_seed(0)
    student = (torch.randn(2, 5, 11) * 3).requires_grad_()
    teacher = torch.randn(2, 5, 11) * 3
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    theirs = gkd.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    kept = labels != -100
    ours = generalized_jsd(student[kept], teacher[kept], beta, temperature).mean()
    (grad_ours,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)


class GivenLogits(nn.Module):
    """A stand-in model whose logits at position t are row t of `logits` [T, vocab]: its hidden states are
    one-hot positions and its output matrix holds the logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(logits.T.clone())
        self.config = SimpleNamespace(router_aux_loss_coef=0.0)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, input_ids, return_hidden=True):
        length = input_ids.shape[1]
        return SimpleNamespace(hidden=torch.eye(length).expand(input_ids.shape[0], length, length), aux_loss=None)


# At temperature 2 the teacher's logits [2 ln 3, 0] give p_t = (3/4, 1/4); the student's zeros p_s = (1/2, 1/2).
P_T, P_S = (0.75, 0.25), (0.5, 0.5)
MIXTURE = tuple(0.5 * t + 0.5 * s for t, s in zip(P_T, P_S))


def kl(p, q) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


@pytest.mark.parametrize("beta, divergence", [
    (0.0, kl(P_T, P_S)),  # forward KL(p_t || p_s) = 0.1308
    (1.0, kl(P_S, P_T)),  # reverse KL(p_s || p_t) = 0.1438
    (0.5, 0.5 * kl(P_T, MIXTURE) + 0.5 * kl(P_S, MIXTURE)),  # JSD(0.5) = 0.0338
])
def test_distillation_loss_equals_its_formula_on_hand_checkable_numbers(beta, divergence):
    # position 0 is trained (label 0); position 1 has wild logits and label -100: it must count for nothing
    student = GivenLogits(torch.tensor([[0.0, 0.0], [9.0, -9.0]]))
    teacher = GivenLogits(torch.tensor([[2 * math.log(3), 0.0], [-9.0, 9.0]]))
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([[0, -100]])}
    loss, metrics = distillation_loss(student, teacher, batch, alpha=0.25, beta=beta, temperature=2.0)
    # alpha * CE (at T = 1: p_s(0) = 1/2) + (1 - alpha) * T² * divergence
    assert loss.item() == pytest.approx(0.25 * math.log(2) + 0.75 * 4 * divergence, rel=1e-5)
    assert metrics["kd"].item() == pytest.approx(divergence, rel=1e-5)
    assert metrics["ce"].item() == pytest.approx(math.log(2), rel=1e-6) and metrics["tokens"].item() == 1


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_loss_of_two_models_equals_trls_on_full_logits(gkd, beta):
    """Chunks of 5 of 20 trained positions, against CE + T² * TRL's loss on the models' full logits."""
    student, teacher = tiny_model(seed=1), tiny_model(seed=2, hidden_size=48, tie_word_embeddings=False)
    teacher.eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :2] = -100  # a prompt
    loss, _ = distillation_loss(student, teacher, {"input_ids": ids, "labels": labels}, alpha=0.3, beta=beta,
                                temperature=1.5, chunk_size=5)
    ours = torch.autograd.grad(loss, list(student.parameters()))
    logits = student(ids).logits
    with torch.no_grad():
        teacher_logits = teacher(ids).logits
    expected = 0.3 * F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100) + \
        0.7 * 1.5**2 * gkd.generalized_jsd_loss(logits, teacher_logits, labels, beta=beta, temperature=1.5)
    theirs = torch.autograd.grad(expected, list(student.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- the teacher ---------------------------------------------------------------------------------------------

def test_a_teacher_with_another_tokenizer_or_vocabulary_is_refused_naming_both(corpus, base_model, tmp_path,
                                                                                capsys):
    text = tmp_path / "text.txt"
    text.write_text("a different text makes a different tokenizer " * 200, encoding="utf-8")
    train_tokenizer([str(text)], vocab_size=280, out_dir=tmp_path / "other", show_progress=False)
    other = model_dir(tmp_path / "other_teacher", tmp_path / "other", seed=0)
    args = ["distill", "--model", str(base_model), "--data", str(corpus[1]), "--lmbda", "0", *QUIET]
    assert cli.main([*args, "--teacher", str(other)]) == 1
    err = capsys.readouterr().err
    assert f"teacher: {other} has another tokenizer than the student's ({base_model})" in err
    wider = model_dir(tmp_path / "wider", corpus[0], seed=0, vocab_size=320)  # the same tokenizer, more rows
    assert cli.main([*args, "--teacher", str(wider)]) == 1
    assert f"teacher: {wider} has 320 token embeddings, the student {base_model} 300" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "0.5"], "alpha: 0.5 with lmbda 0.5 would train the student by cross-entropy on its own samples"),
    (["--data", "SHARDS"], "lmbda: 0.5 (seq_kd: False) generates completions of conversation prompts"),
    (["--teacher", "null"], "teacher: give the teacher's model directory"),
])
def test_bad_options_are_named(corpus, chats, base_model, teacher_dir, capsys, extra, message):
    extra = [str(corpus[1]) if value == "SHARDS" else value for value in extra]
    assert cli.main(["distill", "--model", str(base_model), "--teacher", str(teacher_dir), "--data", str(chats),
                     *extra, *QUIET]) == 1
    assert message in capsys.readouterr().err


# -- on-policy batches ---------------------------------------------------------------------------------------

def test_prompts_and_completion_batches():
    sample = SFTSample([1, 2, 3, 4, 5, 6, 7, 8], [-100, -100, 3, 4, -100, -100, 7, 8])  # two replies
    assert distill.prompt_length(sample) == 6  # the last reply's prompt holds the first reply
    batch = distill.completion_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # position t's label is token t + 1, on the completions only
    assert batch["labels"].tolist() == [[-100, -100, 5, 6, -100], [7, 8, 9, -100, -100]]


def test_completions_come_from_the_students_current_weights(corpus):
    tokenizer = Tokenizer.from_dir(corpus[0])
    model = tiny_model(seed=3, vocab_size=300, max_position_embeddings=256).train()
    sampler = Sampler(model, tokenizer, SamplingParams(max_tokens=8, temperature=0.9), max_batch_size=2,
                      max_len=256)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in ("1+2", "3+4")]
    before = [o.token_ids for o in sampler(prompts, [5, 6])]
    assert model.training  # generation left the model as training found it
    # a training step as the Trainer takes it: fused AdamW updates the same tensors in place, without
    # moving their version counters (a cache keyed on them would not notice)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(torch.tensor([prompts[0]])).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    after = [o.token_ids for o in sampler(prompts, [5, 6])]
    fresh = Engine(copy.deepcopy(model), tokenizer, max_batch_size=2)
    expected = [fresh.generate([p], SamplingParams(max_tokens=8, temperature=0.9, seed=5 + i))[0][0].token_ids
                for i, p in enumerate(prompts)]
    assert after == expected and after != before  # not the old weights, nor their cached prompts


class Recorded:
    """A sampler that records its calls and completes every prompt with `tokens`."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.seeds = tokens, []

    def __call__(self, prompts, seeds):
        self.seeds.append(seeds)
        return [SimpleNamespace(token_ids=self.tokens) for _ in prompts]


@pytest.mark.parametrize("lmbda, seq_kd", [(0.5, False), (0.5, True), (1.0, False), (0.0, True)])
def test_the_choice_of_batches_is_seeded_and_resumes(lmbda, seq_kd):
    samples = [SFTSample([1, 2, 3, 4], [-100, -100, 3, 4]) for _ in range(10)]
    cfg = parse_args_or_raise(distill.DistillConfig, ["--batch-size", "3", "--lmbda", str(lmbda),
                                                      "--seq-kd", str(seq_kd).lower()])
    env = SimpleNamespace(rank=0, world_size=1)

    def batches():
        return distill.DistillBatches(samples, cfg, 0, env, Recorded([7]), Recorded([8, 9]))

    stream = batches()
    kinds = []
    for _ in range(200):
        batch = next(stream)
        completion = batch["labels"][0][batch["labels"][0] != -100].tolist()
        kinds.append({(7,): "student", (8, 9): "teacher", (3, 4): "data"}[tuple(completion)])
        assert batch["on_policy"].item() == (kinds[-1] == "student")
    share = kinds.count("student") / len(kinds)
    assert share == pytest.approx(lmbda, abs=0.08)
    assert set(kinds) - {"student"} <= ({"teacher"} if seq_kd else {"data"})
    # a stream restored at batch 100 draws what the first drew from there on, with the same sampling seeds
    restored, first = batches(), batches()
    for _ in range(100):
        next(first)
    restored.load_state_dict(json.loads(json.dumps(first.state_dict())))  # checkpoints keep it as JSON
    assert [next(restored)["on_policy"].item() for _ in range(100)] == [k == "student" for k in kinds[100:]]
    for kind in ("student", "teacher"):
        assert getattr(restored, kind).seeds == getattr(stream, kind).seeds[kinds[:100].count(kind):]


# -- the stage -----------------------------------------------------------------------------------------------

def distill_args(base_model, teacher_dir, data, run_dir, *extra):
    return ["distill", "--model", str(base_model), "--teacher", str(teacher_dir), "--data", str(data),
            "--batch-size", "4", "--max-new-tokens", "12", "--train.steps", "6", "--train.optim.lr", "3e-3",
            "--train.optim.warmup-steps", "0", "--train.run-dir", str(run_dir), "--train.eval-every", "0",
            "--train.save-every", "3", *QUIET, *extra]


def losses(run_dir) -> list[dict]:
    return [row for row in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]


@pytest.mark.parametrize("extra", [["--train.seed", "2"], ["--lmbda", "0", "--seq-kd", "true", "--alpha", "0.5"]])
def test_a_resumed_run_reproduces_the_uninterrupted_one(base_model, teacher_dir, chats, tmp_path, extra):
    assert cli.main(distill_args(base_model, teacher_dir, chats, tmp_path / "full", *extra)) == 0
    full = losses(tmp_path / "full")
    if extra[0] == "--train.seed":  # seed 2 draws on-policy batches before and after the cut: steps 1, 2, 4, 6
        assert [row["on_policy"] for row in full] == [1, 1, 0, 1, 0, 1]
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-000003", tmp_path / "cut" / "checkpoint-000003")
    assert cli.main(distill_args(base_model, teacher_dir, chats, tmp_path / "cut", *extra, "--resume", "auto")) == 0
    assert [row["loss"] for row in losses(tmp_path / "cut")] == [row["loss"] for row in full[3:]]


def test_on_shards_alpha_1_is_pretraining_and_the_divergence_falls_otherwise(corpus, base_model, teacher_dir,
                                                                              tmp_path):
    tokenizer, data = corpus
    common = ["--model", str(base_model), "--data", str(data), "--seq-len", "32", "--batch-size", "4",
              "--eval-batches", "4", "--train.steps", "8", "--train.eval-every", "0", "--train.save-every", "0",
              "--train.optim.lr", "3e-3", "--train.optim.warmup-steps", "2", *QUIET]
    pretrained = pretrain.run(parse_args_or_raise(pretrain.PretrainConfig,
                                                  [*common, "--train.run-dir", str(tmp_path / "pretrain")]))
    distilled = distill.run(parse_args_or_raise(distill.DistillConfig, [
        *common, "--teacher", str(teacher_dir), "--lmbda", "0", "--alpha", "1", "--train.run-dir",
        str(tmp_path / "alpha1")]))
    torch.testing.assert_close([r["loss"] for r in distilled.history], [r["loss"] for r in pretrained.history],
                               rtol=1e-5, atol=1e-6)
    assert distilled.val_bpb == pytest.approx(pretrained.val_bpb, rel=1e-5)  # the same bits per byte
    kd = distill.run(parse_args_or_raise(distill.DistillConfig, [
        *common, "--teacher", str(teacher_dir), "--lmbda", "0", "--beta", "0", "--train.run-dir",
        str(tmp_path / "kd")])).history
    assert kd[-1]["kd"] < 0.7 * kd[0]["kd"]  # the student moves towards the teacher (0.017 -> 0.010)
    assert kd[-1]["loss"] == pytest.approx(kd[-1]["kd"])  # alpha 0, T 1: the loss is the KL alone

