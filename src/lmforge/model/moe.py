"""The feed-forward layers: a SwiGLU MLP, and a mixture of such MLPs with a learned router.

MoE variants covered, each a few lines in `Router` and `MoE`:
- Mixtral / Qwen: softmax scores, top-k, optional renormalisation of the k weights.
- DeepSeek-V3 (arXiv 2412.19437, section 2.1.2): sigmoid scores; a per-expert bias that
  only steers *which* experts are chosen (auxiliary-loss-free balancing); group-limited
  routing; a scaling factor on the routed output.
- Shared experts that every token uses: DeepSeek's plain MLP, or Qwen2-MoE's MLP whose
  output is scaled by a learned sigmoid gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model import cpu_kernels


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        if cpu_kernels.fusable(self.gate_proj, self.up_proj) and cpu_kernels.usable(x):
            # On a CPU: one matmul for gate and up (larger matmuls run closer to the peak), then
            # one fused pass for silu(gate) * up, forward and backward.
            gate_up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
            if cpu_kernels.usable(gate_up):
                return self.down_proj(cpu_kernels.swiglu(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """Scores every expert for every token and picks the top k (the `gate` of HF's MoE blocks)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if cfg.expert_score_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.sigmoid = cfg.scoring_func == "sigmoid"
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor):
        """x [N, hidden] -> (weights [N, k], experts [N, k], scores [N, E]). Routing runs in fp32."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        choice = scores
        if hasattr(self, "e_score_correction_bias"):
            choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            # Group-limited routing: rate each group by its two best experts, keep topk_group groups.
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)  # the bias picks experts but never weighs them
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts, scores


def load_balancing_loss(scores: torch.Tensor, experts: torch.Tensor, num_experts: int,
                        sigmoid: bool = False) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4), generalised to top-k as
    transformers' `load_balancing_loss_func` does:  E * sum_e f_e * P_e, where f_e is the number
    of (token, slot) assignments to expert e divided by the number of tokens, and P_e the mean
    router probability of e. Sigmoid scores are normalised per token first (DeepSeek-V3, eq. 18).
    It is k at perfect balance and grows as routing concentrates."""
    probs = scores / scores.sum(-1, keepdim=True) if sigmoid else scores
    load = torch.bincount(experts.flatten(), minlength=num_experts).float() / experts.shape[0]
    return num_experts * (load * probs.mean(0)).sum()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.register_buffer("expert_load", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x: torch.Tensor):
        """x [B, T, hidden] -> (output like x, auxiliary load-balancing loss)."""
        flat = x.reshape(-1, x.shape[-1])
        weights, experts, scores = self.gate(flat)
        weights = weights.to(x.dtype)
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)
        out = torch.zeros_like(flat)
        # The readable reference: each expert runs on the tokens routed to it.
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            rows, slot = torch.where(experts == e)
            out.index_add_(0, rows, self.experts[e](flat[rows]) * weights[rows, slot, None])
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(flat)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        if self.training:
            self.expert_load.copy_(counts)
        aux = load_balancing_loss(scores, experts, self.num_experts, self.gate.sigmoid)
        return out.view_as(x), aux

    @torch.no_grad()
    def update_score_bias(self, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing (section 2.1.2): after each step, lower the
        bias of overloaded experts and raise that of underloaded ones by `rate`."""
        bias = self.gate.e_score_correction_bias
        bias += rate * torch.sign(self.expert_load.mean() - self.expert_load)
