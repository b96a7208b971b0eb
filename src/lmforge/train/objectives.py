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

import torch
from torch import nn

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
    -100 = not trained on); optional batch["position_ids"] and batch["document_ids"] for packed rows.

    For MoE models the router's load-balancing loss is added with `config.router_aux_loss_coef`
    (Switch Transformer, Fedus et al. 2021, eq. 4), as transformers' `*ForCausalLM` do.
    Metrics: "ce" (the cross-entropy alone), "aux_loss" (MoE), "tokens" (tokens trained on, which the
    Trainer uses to weigh validation batches).
    """
    extra = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
    output = model(batch["input_ids"], return_hidden=True, **extra)
    ce = chunked_cross_entropy(output.hidden, unwrap_model(model).output_weight, batch["labels"], chunk_size)
    metrics = {"ce": ce.detach(), "tokens": (batch["labels"] != IGNORE_INDEX).sum()}
    return with_router_aux_loss(ce, output, model, metrics), metrics


def with_router_aux_loss(loss: torch.Tensor, output, model: nn.Module, metrics: dict) -> torch.Tensor:
    """loss + router_aux_loss_coef * the MoE load-balancing loss of `output` (a ModelOutput), for every
    objective that trains a MoE model; records it in metrics["aux_loss"]. Dense models: loss unchanged."""
    coef = unwrap_model(model).config.router_aux_loss_coef
    if output.aux_loss is None or coef <= 0:
        return loss
    metrics["aux_loss"] = output.aux_loss.detach()
    return loss + coef * output.aux_loss
