"""A reward model: the Transformer's body with a scalar `score` head in place of the output layer.

    embed_tokens -> blocks -> norm -> hidden at the last token -> score -> r(x)   (one number per sequence)

A reward model maps a whole sequence (a prompt and its reply) to one number that ranks replies as people
would (Ouyang et al. 2022, "Training language models to follow instructions with human feedback", sec. 3.5:
the SFT model with its unembedding layer replaced by a projection to a scalar). The parameter names are
transformers' `<Family>ForSequenceClassification` names with one label: the body under `model.` and the
head `score.weight` [1, hidden], no bias, so its directory loads with `AutoModelForSequenceClassification`.

Where the score is read: transformers takes the head's output at each row's rightmost token that is not
`config.pad_token_id` (GenericForSequenceClassification), and so do we, with the same formula. Rows are
right-padded with that id; causal attention then keeps every real token from seeing the padding after it, so
a sequence scores the same alone or in a batch of longer ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import ModelConfig, ModelConfigError
from lmforge.model.transformer import Transformer


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # [B], each sequence's score, in the weights' dtype
    aux_loss: torch.Tensor | None  # the MoE load-balancing loss, as ModelOutput's (None if dense)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Each row's rightmost position whose token is not `pad_token_id` (0 for a row of padding only),
    transformers' rule for right- and left-padded rows alike. Without a pad id only a single row can be read,
    at its last position (transformers refuses a larger batch too)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ModelConfigError("pad_token_id: not set, so the last token of each row of a batch is unknown")
        return torch.full((1,), T - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


class RewardModel(Transformer):
    """A Transformer whose output layer is a [1, hidden] `score` head; forward(input_ids) -> each row's score."""

    def __init__(self, cfg: ModelConfig):
        if cfg.num_labels != 1:
            raise ModelConfigError(f"num_labels: {cfg.num_labels}; a reward model has 1 (one score per sequence)")
        super().__init__(cfg)
        self.lm_head = None  # the body's output layer is not part of a reward model, tied or not
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, input_ids: torch.Tensor) -> RewardOutput:  # type: ignore[override]
        """input_ids [B, T], right-padded with config.pad_token_id -> RewardOutput (rewards [B])."""
        output = super().forward(input_ids, return_hidden=True)
        last = last_token_index(input_ids, self.config.pad_token_id)
        hidden = output.hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        rewards = self.score(hidden).squeeze(-1).clone()  # not a view of [B, 1]: FSDP2 warns about returned views
        return RewardOutput(rewards, output.aux_loss)

    @torch.no_grad()
    def init_score(self, seed: int | None = None) -> None:
        """A new head ~ N(0, initializer_range), as transformers initialises a head the checkpoint lacks."""
        generator = None if seed is None else torch.Generator(self.score.weight.device).manual_seed(seed)
        self.score.weight.normal_(0.0, self.config.initializer_range, generator=generator)
