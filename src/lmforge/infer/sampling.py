"""Choosing the next token: logit bias, penalties, temperature, top-k / top-p / min-p, seeded draws, log-probs.

Every sample in a batch has its own `SamplingParams` and its own `torch.Generator`, and draws
exactly one number from it per token, so a seeded request produces the same text whatever else
shares the batch. `choose_tokens` handles a batch's rows together where that gives, bit for bit,
the tokens `choose_token` gives them one by one (greedy rows by one argmax; sampled rows on a CPU by
`_sample_rows`). The order of the logits transforms is transformers' (`generate` builds its
processors in this order): repetition penalty, presence/frequency penalties, temperature, top-k,
top-p, min-p. OpenAI's logit bias, which transformers lacks, comes first, as in vLLM's sampler
(bias, then penalties).

Log-probs are the log-softmax of the *unmodified* logits (before bias, penalties, temperature and
filtering), as vLLM and the OpenAI API report them: they say what the model thinks of a token,
not how the sampler was configured.
"""

from __future__ import annotations

import math
import random
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

# vLLM's _SAMPLING_EPS (vllm/sampling_params.py): a temperature below it means greedy. Dividing logits by
# a smaller one can overflow fp32 (by 1e-40, any logit above 0.04 becomes inf, and the softmax NaN). vLLM
# also raises temperatures in (0, 0.01) to 0.01 (its _MAX_TEMP), with a warning; we keep them: fp32 logits
# divided by 1e-5 stay finite (the softmax subtracts the largest), and a distribution that is not finite
# is an error anyway.
SAMPLING_EPS = 1e-5
# Repetition penalty: the logits of seen tokens are multiplied or divided by it, so within these bounds
# any logit below 3e36 in magnitude stays finite in fp32 (vLLM and transformers take any positive value;
# 1e-300 made every logit infinite). Usual values are 1.0-1.5.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# Stop strings: OpenAI allows 4. lm-evaluation-harness's `until` lists have a handful, code tasks ~5-10.
# The Detokenizer's work per token does not grow with them, but their automaton is built per request.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
EXCERPT_CHARS = 40  # the most characters of a client's own text that an error message quotes


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` as an error message may quote it: cut to `limit` characters, saying how many were left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class DistributionError(ValueError):
    """A row's logits give no distribution to draw from (NaN or infinite, or nothing left with probability
    above zero): the model's output for that sample is broken, and sampling from it would give garbage."""


class SamplingParamError(ValueError):
    """A sampling parameter out of range; `field` names it (the server's error reports it as `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 (below SAMPLING_EPS) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, on logits of tokens already in prompt+output
    presence_penalty: float = 0.0  # OpenAI style, on tokens already in the output
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed -> same text, regardless of what else is batched
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # eos is always a stop unless ignore_eos
    ignore_eos: bool = False
    n: int = 1  # samples per prompt, sharing one prefill; sample i uses seed + i
    logprobs: bool = False
    top_logprobs: int = 0  # k alternatives per position
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit
    # vLLM's: the log-probs of the prompt's own tokens (each given the ones before it), with this many
    # alternatives per position; None = not computed. Scoring text (lm-evaluation-harness's loglikelihood
    # via the completions API's `echo`) needs them; such a prompt is prefilled whole, not from the prefix cache.
    prompt_logprobs: int | None = None
    # Constrained decoding: a grammar (grammar.py's json_grammar / lark_grammar) every token must keep to.
    grammar: str | None = None

    def validate(self, vocab_size: int) -> None:
        """Raise SamplingParamError (a ValueError) naming the first bad field."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("n", self.n >= 1, "must be >= 1"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "must be None or in [0, 20]"),
            # a list: a string is iterable too, and would stop at each of its characters
            ("stop", isinstance(self.stop, (list, tuple)) and len(self.stop) <= MAX_STOP_STRINGS
             and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"must be a list of at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
             "characters"),
            ("stop_token_ids", all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids),
             f"must be token ids in [0, {vocab_size})"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("logit_bias", all(isinstance(t, int) and 0 <= t < vocab_size and -100.0 <= b <= 100.0
                               for t, b in self.logit_bias.items()),
             f"must map token ids in [0, {vocab_size}) to biases in [-100, 100]"),
        ]
        for name, ok, why in checks:
            if not ok:
                # reprlib: a value can be a long list of long strings, not worth echoing whole
                raise SamplingParamError(name, f"{name}={reprlib.repr(getattr(self, name))}: {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def parse_logit_bias(bias: Mapping[str, object], vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias, {"token id": bias}, as SamplingParams takes it: {token id: bias}. The keys are
    token ids written in decimal (JSON object keys are strings; so are the TOKEN_ID parts of the command
    line's TOKEN_ID=BIAS), the biases numbers in [-100, 100] (bool is not one, as JSON's true is not 1).

    Raises SamplingParamError naming the first bad entry alone, its field "logit_bias" for a key that is not
    a token id of this vocabulary and "logit_bias.KEY" for a bad bias: the map may hold one entry per token
    of the vocabulary, and its keys come from a client (quoted in an excerpt)."""
    ids = {}
    for key, value in bias.items():
        token = int(key) if key.isascii() and key.isdigit() and len(key) < 20 else vocab_size
        if token >= vocab_size:
            raise SamplingParamError("logit_bias", f"logit_bias: '{excerpt(key)}' is not a token id of this model "
                                                   f"(0 to {vocab_size - 1})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise SamplingParamError(f"logit_bias.{key}",
                                     f"logit_bias.{key}={reprlib.repr(value)}: must be a number in [-100, 100]")
        ids[token] = float(value)
    return ids


class SamplerState:
    """What one sample needs to pick its tokens: its params, its generator, the token counts the
    penalties read (kept as [vocab] tensors, only when a penalty is on) and its logit bias (token ids
    and biases as tensors, None without one)."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int, seed: int | None,
                 device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if not params.greedy:  # on the logits' device: torch.multinomial needs a generator there
            seed = random.randrange(2**63) if seed is None else seed
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seen = self.counts = None
        if params.penalized:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # in prompt or output
            self.seen[torch.tensor(prompt, dtype=torch.long, device=device)] = True
            self.counts = torch.zeros(vocab_size, device=device)  # times in the output
        self.bias = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias.items())
            self.bias = (torch.tensor(ids, dtype=torch.long, device=device),
                         torch.tensor(values, dtype=torch.float32, device=device))

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.seen[token] = True
            self.counts[token] += 1


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
    """logits [V] -> penalised logits [V].

    Repetition (CTRL, Keskar et al. 2019, as transformers' RepetitionPenaltyLogitsProcessor):
    a logit of a token already in prompt or output is divided by the penalty if positive and
    multiplied by it if negative. Presence and frequency (OpenAI's definition, output only):
    logit - frequency_penalty * count - presence_penalty * (count > 0).
    """
    if params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if params.presence_penalty or params.frequency_penalty:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set the logits of excluded tokens to -inf (logits [V], already divided by the temperature).

    top-k: keep the k largest (ties at the k-th kept). top-p (nucleus, Holtzman et al. 2019): keep
    the smallest set of most likely tokens whose probability reaches top_p. min-p (Nguyen et al.
    2024): keep tokens whose probability is at least min_p times the most likely one's.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = logits.softmax(-1)
        # The nucleus is usually small: look among the 256 most likely tokens first, and sort the
        # whole vocabulary (a cost in proportion to its size, every row) only when they do not reach top_p.
        top, order = probs.topk(min(256, probs.shape[-1]))
        if top.sum() < top_p:
            top, order = probs.sort(descending=True)
        mass_before = top.cumsum(-1) - top  # probability of the strictly more likely tokens
        keep = order[mass_before < top_p]  # the most likely token always has mass_before 0
        logits = torch.full_like(logits, float("-inf")).index_copy_(0, keep, logits[keep])
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, states: list[SamplerState]) -> list[int | DistributionError]:
    """One next token per row of logits [B, V] (fp32), row i sampled with states[i]. A row that gives no
    distribution gets its DistributionError instead of a token, and the other rows their tokens as usual
    (each drew its one random number, so a seeded sample goes on as if that row were not there).

    Rows are chosen together where that gives the very tokens `choose_token` gives them one at a time:
    greedy rows without bias or penalties by one argmax, sampled rows (of fp32 logits on a CPU) by
    `_sample_rows`; the rest (greedy rows with bias or penalties, sampled rows on another device) one by one."""
    chosen: list[int | DistributionError] = [0] * len(states)
    greedy = [i for i, s in enumerate(states) if s.params.greedy and s.seen is None and s.bias is None]
    batched = logits.device.type == "cpu" and logits.dtype == torch.float32
    sampled = [i for i, s in enumerate(states) if not s.params.greedy] if batched else []
    rest = sorted(set(range(len(states))) - set(greedy) - set(sampled))
    for rows, choose in ((greedy, _argmax_rows), (sampled, _sample_rows), (rest, choose_one_by_one)):
        if rows:
            part = logits if len(rows) == len(states) else logits[rows]
            for i, token in zip(rows, choose(part, [states[i] for i in rows])):
                chosen[i] = token
    return chosen


def choose_one_by_one(logits: torch.Tensor, states: list[SamplerState]) -> list[int | DistributionError]:
    """choose_token on each row of logits [B, V] in turn, a row without a distribution getting its error: the
    path of the rows choose_tokens cannot batch, and the reference its batched paths must equal."""
    tokens: list[int | DistributionError] = []
    for row, state in zip(logits, states):
        try:
            tokens.append(choose_token(row, state))
        except DistributionError as error:
            tokens.append(error)
    return tokens


def _argmax_rows(logits: torch.Tensor, states: list[SamplerState]) -> list[int | DistributionError]:
    """Greedy rows without bias or penalties, in one op, no per-row tensor work; in NumPy on a CPU because
    PyTorch runs an argmax this large on its OpenMP threads, which then spin waiting for more work, on the
    cores the next C decode step needs (BENCHMARKS.md: slower steps in the engine). Both take the first
    largest value, as choose_token's argmax, and NaN for the largest value, so `best` is finite only where
    the whole row's maximum is."""
    if logits.device.type == "cpu":
        rows = logits.numpy()
        tokens = rows.argmax(-1)
        best = rows[np.arange(len(rows)), tokens]
    else:
        best, tokens = logits.max(-1)
    return [token if math.isfinite(value) else _not_finite(value)
            for token, value in zip(tokens.tolist(), best.tolist())]


# _sample_rows takes the softmax and the float64 sums of at most this many logits at a time (rows x vocabulary):
# 10 rows of a 6400-token vocabulary, 32 of 2048, one row of 151936, so a chunk's temporaries (256 KB of fp32
# probabilities, 512 KB of float64) stay in a core's L2 cache. Measured at batch 128, 1 thread: chunks of 4-64 rows
# took 1.6-1.8 ms (vocabulary 6400), 0.75-0.95 ms (2048) and 8.4-9.8 ms (32000); all 128 rows at once 5.3, 1.9, 37.
SAMPLE_CHUNK = 1 << 16


def _sample_rows(logits: torch.Tensor, states: list[SamplerState]) -> list[int | DistributionError]:
    """choose_token for rows that all sample (temperature above SAMPLING_EPS), fp32 logits [B, V] on a CPU,
    in a few ops per chunk of rows instead of a dozen per row (RL rollouts sample 64-128 rows at a time).

    Invariant: the tokens are bit-identical to choose_token's, row by row, so a seeded sample gives the same
    text whatever shares its batch. Why: every value goes through the same PyTorch ops on the same inputs
    (`_sampling_logits`, then softmax, the float64 cumsum, the search), and on a CPU each of these kernels
    computes one row by the same sequential or vectorised loop whatever other rows share the tensor (the
    float64 cumsum adds a row's probabilities in order; tests/test_sampling_batched.py checks all of it). Each
    row draws its one number from its own generator, as `draw` does, and a row without a distribution none.
    Not on a GPU: there a kernel's summation order may follow the tensor's shape (a 1-D cumsum is a device-wide
    scan, a [B, V] one a scan per row), so rows sampled there keep to choose_token."""
    cdf = torch.empty(logits.shape, dtype=torch.float64)
    step = max(1, SAMPLE_CHUNK // logits.shape[-1])
    for start in range(0, len(states), step):
        rows = _sampling_logits(logits[start:start + step], states[start:start + step])
        torch.cumsum(rows.softmax(-1).double(), -1, out=cdf[start:start + step])
    totals = cdf[:, -1]
    fine = [0.0 < total < math.inf for total in totals.tolist()]
    u = torch.tensor([torch.rand(1, generator=s.generator, dtype=torch.float64).item() if ok else math.nan
                      for s, ok in zip(states, fine)], dtype=torch.float64)
    picks = torch.searchsorted(cdf, (u * totals)[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
    return [pick if ok else _no_distribution(total)
            for pick, ok, total in zip(picks.tolist(), fine, totals.tolist())]


def _sampling_logits(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """The logits [B, V] that sampled rows draw from, each row as choose_token makes it alone: bias and
    penalties, the division by its temperature (fp32, as PyTorch divides an fp32 tensor by a Python float),
    top-k / top-p / min-p. `logits` itself where none of these changes a value, else a new tensor."""
    params = [s.params for s in states]
    if any(s.bias is not None or s.seen is not None for s in states):
        logits = torch.stack([_bias_and_penalize(row, s) for row, s in zip(logits, states)])
    if any(p.temperature != 1.0 for p in params):  # x / 1 is x, bit for bit: skip the op where it changes nothing
        logits = logits / torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None]
    return filter_rows(logits, params)


def filter_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filter_logits on each row of logits [B, V] with its own params' top_k, top_p and min_p: each filter
    in a few ops over the rows that use it, the same ops as filter_logits', so bit-identical to it row by row
    (see _sample_rows). `logits` itself where no row has a filter on, else a new tensor: never written to."""
    vocab = logits.shape[-1]
    logits = _on_rows(logits, [0 < p.top_k < vocab for p in params],
                      lambda rows, on: _top_k_rows(rows, [params[i].top_k for i in on]))
    logits = _on_rows(logits, [p.top_p < 1.0 for p in params],
                      lambda rows, on: _top_p_rows(rows, [params[i].top_p for i in on]))
    return _on_rows(logits, [p.min_p > 0.0 for p in params],
                    lambda rows, on: _min_p_rows(rows, [params[i].min_p for i in on]))


def _on_rows(logits: torch.Tensor, flags: list[bool], transform) -> torch.Tensor:
    """`logits` with transform(rows, indices) in place of the rows where `flags` is true: `logits` itself
    where there are none, else a new tensor (`transform` returns one)."""
    on = [i for i, flag in enumerate(flags) if flag]
    if not on:
        return logits
    if len(on) == len(flags):
        return transform(logits, on)
    index = torch.tensor(on, device=logits.device)
    return logits.index_copy(0, index, transform(logits[index], on))


def _top_k_rows(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """filter_logits' top-k, a k per row: a row's k-th value of the k_max largest is its k-th largest, the
    same value as topk(k).values[-1] (topk's values are sorted, and the k-th largest value is one number)."""
    k = torch.tensor(top_k, device=logits.device)
    kth = logits.topk(max(top_k)).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p_rows(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """filter_logits' top-p, a top_p per row, as fp32 (PyTorch compares an fp32 tensor with a Python float
    in fp32): the 256 most likely tokens of every row, then a sort of the whole row for the rows whose 256
    do not reach their top_p (each row's choice made as filter_logits makes it, from the same sum)."""
    probs = logits.softmax(-1)
    p = torch.tensor(top_p, dtype=torch.float32, device=logits.device)[:, None]
    top, order = probs.topk(min(256, probs.shape[-1]))
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, top.cumsum(-1) - top < p)
    short = (top.sum(-1) < p[:, 0]).nonzero()[:, 0]
    if len(short):
        top, order = probs[short].sort(descending=True)
        keep[short] = torch.zeros_like(top, dtype=torch.bool).scatter_(1, order, top.cumsum(-1) - top < p[short])
    return logits.masked_fill(~keep, float("-inf"))


def _min_p_rows(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """filter_logits' min-p, a min_p per row, as fp32 (as PyTorch multiplies an fp32 tensor by a Python float)."""
    probs = logits.softmax(-1)
    threshold = torch.tensor(min_p, dtype=torch.float32, device=logits.device)[:, None] * probs.amax(-1, True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _bias_and_penalize(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """logits [V] with the state's logit bias added, then its penalties applied (a new tensor if any)."""
    if state.bias is not None:
        logits = logits.index_add(0, *state.bias)
    if state.seen is not None:
        logits = apply_penalties(logits, state.params, state.seen, state.counts)
    return logits


def choose_token(logits: torch.Tensor, state: SamplerState) -> int:
    """One next token from logits [V]; raises DistributionError where they give no distribution."""
    p = state.params
    logits = _bias_and_penalize(logits, state)
    if p.greedy:
        token = int(logits.argmax())
        if not math.isfinite(value := float(logits[token])):
            raise _not_finite(value)
        return token
    logits = filter_logits(logits / p.temperature, p.top_k, p.top_p, p.min_p)
    return draw(logits.softmax(-1), state.generator)


def _not_finite(largest: float) -> DistributionError:
    return DistributionError(f"the model's logits are not finite (the largest is {largest}): no token to choose")


def _no_distribution(total: float) -> DistributionError:
    return DistributionError(f"the probabilities sum to {total}: no token to draw (NaN or infinite logits)")


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V] by inverting the cumulative distribution at a uniform draw: one
    random number per token (torch.multinomial draws V exponentials, one per vocabulary entry). Raises
    DistributionError where the probabilities do not sum to a positive finite number (a NaN or an
    infinite logit makes the softmax all NaN, and the search below would then pick the last token)."""
    cdf = probs.double().cumsum(-1)
    if not 0.0 < (total := float(cdf[-1])) < math.inf:
        raise _no_distribution(total)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * total
    # right=True: the first token whose cumulative probability exceeds u, never one of probability 0
    return int(torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1))


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int
                   ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-softmax of the raw logits [B, V]: each row's chosen token's log-prob, and its `top` best
    alternatives as (id, logprob), most likely first."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if top == 0:
        return chosen, [[] for _ in tokens]
    values, ids = logp.topk(top, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
