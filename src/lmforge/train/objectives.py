"""Training objectives computed from the model's final hidden states, a chunk of tokens at a time.

The output projection is the largest activation in a small model's step: B*T rows of `vocab` fp32
logits (8 x 2048 tokens x 151k vocab = 10 GB). Here the logits of at most `chunk_size` tokens exist
at any moment, in the forward pass and in the backward pass:

`chunked_cross_entropy` computes, chunk by chunk, the loss *and* its gradients with respect to the
hidden states and the output matrix inside the forward pass (the approach of Liger Kernel's fused
linear cross-entropy, Hsu et al. 2024, arXiv 2410.10989); backward only scales the stored gradients.

A stage's loss function has the signature the Trainer expects: `loss_fn(model, batch) -> (loss, metrics)`;
`causal_lm_loss` is the one pretraining and SFT use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.data.sft import IGNORE_INDEX
from lmforge.model import cpu_kernels

DEFAULT_CHUNK = 4096


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Transformer inside a DistributedDataParallel wrapper (FSDP2 and `module.compile()` wrap nothing)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight.T, labels), with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, need_hidden_grad, need_weight_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        w = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
            logits = h @ w.T
            if cpu_kernels.usable(logits):
                # One fused pass per row: the loss, and the logits overwritten with their gradient.
                total += cpu_kernels.cross_entropy_(logits, y, IGNORE_INDEX).sum()
                grad_logits = logits
            else:
                valid = y != IGNORE_INDEX
                logprobs = logits.float().log_softmax(-1)
                total -= (logprobs.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * valid).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d CE / d logits = softmax(logits) - onehot(label); zero for ignored tokens.
                grad_logits = logprobs.exp_()  # the softmax, in the log-probabilities' memory
                rows = valid.nonzero().squeeze(1)
                grad_logits[rows, y[rows]] -= 1.0
                if rows.numel() < len(y):
                    grad_logits *= valid[:, None]
                grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ w
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over tokens whose label is not -100.

    hidden [..., H] (any leading shape), weight [vocab, H], labels like hidden's leading shape.
    Equal in value and gradients to `F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)`,
    without ever holding more than `chunk_size` rows of logits.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    grad_on = torch.is_grad_enabled()
    total = _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_size,
                                       grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    # max(1, .): a batch with no trained token gives loss 0, not NaN.
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                   chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy: batch["input_ids"] [B, T] predicts batch["labels"] [B, T] (already shifted;
    -100 = not trained on); optional batch["position_ids"] and batch["document_ids"] for packed rows, and
    batch["pixel_values"] for a vision-language model (model/llava.py: its images' placeholders in input_ids).

    For MoE models the router's load-balancing loss is added with `config.router_aux_loss_coef`
    (Switch Transformer, Fedus et al. 2021, eq. 4), as transformers' `*ForCausalLM` do.
    Metrics: "ce" (the cross-entropy alone), "aux_loss" (MoE), "tokens" (tokens trained on, which the
    Trainer uses to weigh validation batches).
    """
    extra = {k: batch[k] for k in ("position_ids", "document_ids", "pixel_values") if k in batch}
    output = model(batch["input_ids"], return_hidden=True, **extra)
    ce = chunked_cross_entropy(output.hidden, unwrap_model(model).output_weight, batch["labels"], chunk_size)
    metrics = {"ce": ce.detach(), "tokens": (batch["labels"] != IGNORE_INDEX).sum()}
    return with_router_aux_loss(ce, output, model, metrics), metrics


def with_router_aux_loss(loss: torch.Tensor, output, model: nn.Module, metrics: dict) -> torch.Tensor:
    """loss + router_aux_loss_coef * the MoE load-balancing loss of `output` (a ModelOutput), for every
    objective that trains a MoE model; records it in metrics["aux_loss"]. Dense models: loss unchanged."""
    if output.aux_loss is None:
        return loss
    coef = unwrap_model(model).config.router_aux_loss_coef
    if coef <= 0:
        return loss
    metrics["aux_loss"] = output.aux_loss.detach()
    return loss + coef * output.aux_loss


# -- preference optimisation: sequence log-probabilities and the DPO family --------------------------------

class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(target) of each row of `hidden @ weight.T` ([N], fp32; 0 where the target is -100), one chunk of
    rows at a time. Forward keeps only each row's log-sum-exp; backward recomputes a chunk's logits and turns
    them into their gradient in place (d log p_t / d logits = onehot(t) - softmax), so one chunk of [rows,
    vocab] logits exists at a time, as in the chunked cross-entropy, whatever the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, with_entropy=False):
        w = weight.to(hidden.dtype)
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        entropy = torch.zeros_like(logps) if with_entropy else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end] @ w.T).float()
            lse[start:end] = logits.logsumexp(-1)
            logps[start:end] = logits.gather(1, targets[start:end].clamp(min=0)[:, None]).squeeze(1) - lse[start:end]
            if with_entropy:  # H = lse - sum_v p_v * logit_v, of the whole distribution (a diagnostic: no gradient)
                entropy[start:end] = lse[start:end] - (logits.softmax(-1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        logps.masked_fill_(targets == IGNORE_INDEX, 0.0)
        if not with_entropy:
            return logps
        ctx.mark_non_differentiable(entropy)
        return logps, entropy.masked_fill_(targets == IGNORE_INDEX, 0.0)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        w = weight.to(hidden.dtype)
        upstream = grad_logps.float().masked_fill(targets == IGNORE_INDEX, 0.0)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h, y, g = hidden[start:end], targets[start:end], upstream[start:end]
            grad_logits = (h @ w.T).float().sub_(lse[start:end, None]).exp_().mul_(-g[:, None])  # -g softmax
            rows = (y != IGNORE_INDEX).nonzero().squeeze(1)
            grad_logits[rows, y[rows]] += g[rows]  # + g onehot
            grad_logits = grad_logits.to(h.dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ w
            if need_weight:
                grad_weight += (grad_logits.T @ h).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK,
                temperature: float = 1.0, with_entropy: bool = False):
    """(logps, entropy, output): each labelled token's log-probability given the tokens before it, [B, T] fp32
    aligned with `labels` (HF style: label t is token t; 0 where -100), of the model's distribution at
    `temperature` (its logits divided by it, as TRL's GRPO scores what it sampled at that temperature); the
    entropy of that distribution at each labelled position ([B, T], no gradient) or None; the model's output.
    Chunked as sequence_logps: at most `chunk_size` positions' logits at a time."""
    output = model(input_ids, return_hidden=True)
    weight = unwrap_model(model).output_weight
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    hidden = output.hidden.reshape(-1, output.hidden.shape[-1])
    if temperature != 1.0:
        hidden = hidden / temperature  # (h / T) @ W.T = logits / T
    result = _ChunkedTokenLogps.apply(hidden, weight, targets.reshape(-1), chunk_size, with_entropy)
    per_position, entropy = result if with_entropy else (result, None)

    def to_labels(values: torch.Tensor) -> torch.Tensor:  # position t predicts token t + 1
        values = values.view(labels.shape)
        return torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1)

    return to_labels(per_position), None if entropy is None else to_labels(entropy), output


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(sum, count, output): over each row, the sum of the log-probabilities of its labelled tokens and
    their count, [B] fp32 each (the log-likelihood of a completion), and the model's output (for MoE's
    aux_loss). `labels` are aligned with `input_ids` (Hugging Face style: label t is token t, predicted from
    the tokens before it; -100 where not scored). At most `chunk_size` positions' logits exist at a time,
    in forward and in backward (_ChunkedTokenLogps): a DPO step holds what an SFT step holds."""
    output = model(input_ids, return_hidden=True)
    weight = unwrap_model(model).output_weight
    # position t predicts label t + 1; the last position predicts nothing
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    hidden = output.hidden.reshape(-1, output.hidden.shape[-1])
    per_token = _ChunkedTokenLogps.apply(hidden, weight, targets.reshape(-1), chunk_size).view(labels.shape)
    return per_token.sum(-1), (targets != IGNORE_INDEX).sum(-1).float(), output


# What each loss needs: the reference model's log-probabilities, or not (SimPO, CPO, ORPO are reference-free).
PAIR_LOSSES = {"sigmoid": True, "robust": True, "ipo": True, "hinge": True, "sigmoid_norm": True, "sft": False,
               "simpo": False, "cpo": False, "orpo": False}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stably (Mächler 2012)."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_loss(loss_type: str, logps: tuple[torch.Tensor, torch.Tensor], counts: tuple[torch.Tensor, torch.Tensor],
              ref_logps: tuple[torch.Tensor, torch.Tensor] | None, beta: float, label_smoothing: float = 0.0,
              simpo_gamma: float = 0.5) -> torch.Tensor:
    """The per-pair loss [B] of one of TRL's preference losses, named as TRL names them, from the summed
    log-probabilities of the chosen and rejected completions (and their token counts, and the reference's):

    sigmoid       DPO (Rafailov et al. 2023, eq. 7): -log σ(β Δ), Δ = (log π/π_ref)(chosen) - (rejected); with
                  label_smoothing ε, conservative DPO (Mitchell 2023): -(1-ε) log σ(βΔ) - ε log σ(-βΔ)
    robust        robust DPO (Chowdhury et al. 2024): the two terms of conservative DPO unbiased, ÷ (1 - 2ε)
    ipo           IPO (Azar et al. 2023, eq. 17) on per-token log-ratios: (Δ/|y| - 1/(2β))²
    hinge         SLiC (Zhao et al. 2023): max(0, 1 - βΔ)
    sigmoid_norm  DPO on per-token (length-normalised) log-ratios
    sft           NLL of the chosen tokens, over the batch's chosen tokens (TRL's "sft" term)
    simpo         SimPO (Meng et al. 2024, eq. 6), reference-free: -log σ(β(avg_c - avg_r) - γ)
    cpo           CPO (Xu et al. 2024), reference-free: -log σ(β(log π_c - log π_r)); its NLL term is "sft"
    orpo          ORPO (Hong et al. 2024, eq. 6-7): NLL(chosen) - β log σ(log odds_c - log odds_r), odds from
                  per-token (average) log-probabilities, log odds = p - log(1 - e^p) (TRL's ORPOTrainer)
    """
    (chosen, rejected), (chosen_n, rejected_n) = logps, counts
    if loss_type == "sft":
        return (-chosen.sum() / chosen_n.sum().clamp(min=1)).expand(chosen.shape[0])
    if loss_type in ("simpo", "orpo", "cpo"):
        if loss_type == "cpo":
            return -F.logsigmoid(beta * (chosen - rejected))
        avg_c, avg_r = chosen / chosen_n.clamp(min=1), rejected / rejected_n.clamp(min=1)
        if loss_type == "simpo":
            return -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma)
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        return -avg_c - beta * F.logsigmoid(log_odds)
    chosen_ratio, rejected_ratio = chosen - ref_logps[0], rejected - ref_logps[1]
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "robust":
        return (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    normalised = chosen_ratio / chosen_n.clamp(min=1) - rejected_ratio / rejected_n.clamp(min=1)
    if loss_type == "ipo":
        return (normalised - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * normalised)
    raise ValueError(f"loss_type: unknown '{loss_type}' (one of {', '.join(PAIR_LOSSES)}, or kto)")


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
             desirable: torch.Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8, as TRL's KTOTrainer computes it): per-sample losses [B] and the
    reference point z. z = max(0, mean(log π/π_ref of mismatched completions)), detached: an estimate of
    KL(π || π_ref) from each prompt paired with another sample's completion. A desirable completion's loss is
    1 - σ(β(r - z)), an undesirable one's 1 - σ(β(z - r)), r = log π/π_ref of the completion; each weighted."""
    shifted = (kl_logps - ref_kl_logps).detach()
    # over the whole global batch, as TRL gathers it from every process
    z = (_global_mean(shifted) if torch.distributed.is_initialized() else shifted.mean()).clamp(min=0)
    ratio = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))))
    return losses, z


def _global_mean(values: torch.Tensor) -> torch.Tensor:
    totals = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
    torch.distributed.all_reduce(totals)
    return totals[0] / totals[1]


# -- knowledge distillation: a divergence between the teacher's and the student's next-token distributions ---

def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """The generalised Jensen-Shannon divergence of each row [N], both distributions softened by `temperature`
    (GKD, Agarwal et al. 2024, eq. 1, as TRL's `generalized_jsd_loss` computes it before its reduction):

        JSD(β) = β KL(p_t || m) + (1 - β) KL(p_s || m),   m = β p_t + (1 - β) p_s

    β = 0 is the forward KL(p_t || p_s) of classic distillation (Hinton et al. 2015), which covers every mode
    of the teacher; β = 1 the reverse KL(p_s || p_t) of MiniLLM (Gu et al. 2024), which seeks the teacher's
    modes. Both are taken exactly, not as limits: the β-weighted mixture tends to 0 at either end."""
    student = (student_logits.float() / temperature).log_softmax(-1)
    teacher = (teacher_logits.float() / temperature).log_softmax(-1)
    if beta == 0:
        return (teacher.exp() * (teacher - student)).sum(-1)
    if beta == 1:
        return (student.exp() * (student - teacher)).sum(-1)
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log(1 - beta))
    return (beta * (teacher.exp() * (teacher - mixture)).sum(-1)
            + (1 - beta) * (student.exp() * (student - mixture)).sum(-1))


def _chunk_distillation(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                        teacher_weight: torch.Tensor, targets: torch.Tensor, beta: float,
                        temperature: float) -> torch.Tensor:
    """[sum of the cross-entropy, sum of the divergence] over the rows of one chunk (every row trained). The
    teacher's logits are made here, without gradients, so that only one chunk of them ever exists."""
    logits = hidden @ weight.to(hidden.dtype).T
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.to(teacher_hidden.dtype).T
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
    return torch.stack([ce, generalized_jsd(logits, teacher_logits, beta, temperature).sum()])


def distillation_loss(model: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], alpha: float,
                      beta: float, temperature: float, chunk_size: int = DEFAULT_CHUNK
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Knowledge distillation of `teacher` into `model` on batch["input_ids"] [B, T], over the tokens whose
    (shifted, as for causal_lm_loss) batch["labels"] are not -100, averaged over those tokens:

        alpha * CE(labels) + (1 - alpha) * T² * JSD(β) at temperature T

    β = 0 with alpha > 0 is the offline recipe of MiniMind (forward KL at T, mixed with the cross-entropy);
    alpha = 0, T = 1 is TRL's GKD loss. T² keeps the soft targets' gradients, which shrink as 1/T², on the
    scale of the cross-entropy's when T changes (Hinton et al. 2015, section 2).

    The teacher runs without gradients (in whatever mode its caller left it: eval). Memory: only the trained
    positions are projected, `chunk_size` at a time; a chunk's logits of both models, their log-probabilities
    and the mixture are recomputed in the backward pass (activation checkpointing) rather than kept, so the
    loss holds one chunk's worth whatever the batch: 7 fp32 [chunk_size, vocab] arrays at its peak for a KL,
    11 for a JSD between them (measured: peak resident memory of a step on 2048 x 32000 logits). Metrics:
    "ce" (what validation reports as the loss, and bits per byte), "kd" (the divergence, before T²),
    "tokens"."""
    output = model(batch["input_ids"], return_hidden=True)
    with torch.no_grad():
        teacher_hidden = teacher(batch["input_ids"], return_hidden=True).hidden
    trained = batch["labels"] != IGNORE_INDEX
    hidden, teacher_hidden, targets = output.hidden[trained], teacher_hidden[trained], batch["labels"][trained]
    weight = unwrap_model(model).output_weight
    sums = torch.zeros(2, device=hidden.device)
    for start in range(0, len(targets), chunk_size):
        piece = (hidden[start:start + chunk_size], weight, teacher_hidden[start:start + chunk_size],
                 teacher.output_weight, targets[start:start + chunk_size], beta, temperature)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            sums = sums + checkpoint(_chunk_distillation, *piece, use_reentrant=False)
        else:
            sums = sums + _chunk_distillation(*piece)
    count = trained.sum()
    ce, divergence = sums / count.clamp(min=1)
    loss = alpha * ce + (1 - alpha) * temperature**2 * divergence
    metrics = {"ce": ce.detach(), "kd": divergence.detach(), "tokens": count}
    return with_router_aux_loss(loss, output, model, metrics), metrics
