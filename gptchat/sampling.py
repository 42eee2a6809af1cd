"""Choosing the next token: the sampling parameters and a per-sequence sampler.

One step turns the model's last-position logits into one token id, in this order:

    logit_bias -> repetition penalty -> presence/frequency penalty -> no-repeat-ngram ban
    -> greedy argmax, or: temperature -> top-k -> top-p -> min-p -> a draw from the distribution

The processors follow the reference semantics of Hugging Face `generate` (repetition penalty,
no-repeat-ngram, top-k/top-p/min-p) and of the OpenAI API (logit_bias, presence/frequency penalty),
so that a user's settings mean what they mean elsewhere.

A `TokenSampler` holds one sequence's state (history, a `seen` mask, token counts, n-gram table, RNG)
and updates it by one token per step, so the per-token cost does not grow with the sequence.

Where this process has gptchat's kernels loaded (quantized models load them), a sampled token without top-k
is drawn in one call to `kernels/sampling.cpp`: the same rule as the NumPy steps here (which it is tested
against, token for token), without their ~20 calls that cost 5-30 us each right after a decode step. Logits
that need no bias, penalty or ban are read where they are, not copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gptchat import kernels
from gptchat.errors import ContextLengthError, InvalidParameterError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 256  # None => until max_length / context end
    max_length: int | None = None  # total length prompt+new, as in HF generate(max_length=...)
    temperature: float = 1.0  # 0 => greedy (argmax)
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # in (0, 1]; 1 => off
    min_p: float = 0.0  # in [0, 1); 0 => off
    repetition_penalty: float = 1.0  # > 0; HF/CTRL style over prompt+generated tokens
    presence_penalty: float = 0.0  # OpenAI style, in [-2, 2], over generated tokens
    frequency_penalty: float = 0.0  # OpenAI style, in [-2, 2], over generated tokens
    no_repeat_ngram_size: int = 0  # HF semantics over prompt+generated ids; 0 => off
    stop: tuple[str, ...] | list[str] = ()  # stop strings (text)
    stop_token_ids: tuple[int, ...] | list[int] = ()
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI style additive bias, values in [-100, 100]
    logprobs: bool = False  # report each sampled token's log-probability (Delta.logprobs)
    top_logprobs: int = 0  # ... and that many most likely alternatives, 0..MAX_TOP_LOGPROBS

    def validate(self) -> "SamplingParams":
        """Raise InvalidParameterError for the first bad value; normalise containers; return self.

        A lone stop string becomes a 1-tuple, and logit_bias keys may be strings of digits (as in the
        OpenAI API's JSON), which become ints.
        """
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and _int(name, value) < 1:
                raise InvalidParameterError(name, f"{name} must be >= 1 (got {value})")
        t = _float("temperature", self.temperature)
        if not (t >= 0 and math.isfinite(t)):
            raise InvalidParameterError("temperature", f"temperature must be >= 0 and finite (got {t})")
        if _int("top_k", self.top_k) < 0:
            raise InvalidParameterError("top_k", f"top_k must be >= 0 (got {self.top_k})")
        if not (0 < _float("top_p", self.top_p) <= 1):
            raise InvalidParameterError("top_p", f"top_p must be in (0, 1] (got {self.top_p})")
        if not (0 <= _float("min_p", self.min_p) < 1):
            raise InvalidParameterError("min_p", f"min_p must be in [0, 1) (got {self.min_p})")
        rp = _float("repetition_penalty", self.repetition_penalty)
        if not (rp > 0 and math.isfinite(rp)):
            raise InvalidParameterError(
                "repetition_penalty", f"repetition_penalty must be > 0 and finite (got {rp})"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _float(name, getattr(self, name))
            if not (-2 <= value <= 2):
                raise InvalidParameterError(name, f"{name} must be in [-2, 2] (got {value})")
        if _int("no_repeat_ngram_size", self.no_repeat_ngram_size) < 0:
            raise InvalidParameterError(
                "no_repeat_ngram_size", f"no_repeat_ngram_size must be >= 0 (got {self.no_repeat_ngram_size})"
            )
        self._validate_stops()
        if self.seed is not None:
            _int("seed", self.seed)
        if self.logit_bias is not None:
            self._validate_logit_bias()
        if not (0 <= _int("top_logprobs", self.top_logprobs) <= MAX_TOP_LOGPROBS):
            raise InvalidParameterError(
                "top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {self.top_logprobs})"
            )
        return self

    def _validate_stops(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise InvalidParameterError("stop", f"stop must be a string or a list of strings (got {stop!r})")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError("stop", f"stop must have at most {MAX_STOP_STRINGS} strings (got {len(stop)})")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError("stop", f"stop strings must be non-empty strings (got {s!r})")
        self.stop = tuple(stop)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise InvalidParameterError(
                "stop_token_ids", f"stop_token_ids must be a list of ints (got {self.stop_token_ids!r})"
            )
        for i in self.stop_token_ids:
            if _int("stop_token_ids", i) < 0:
                raise InvalidParameterError("stop_token_ids", f"stop_token_ids must be >= 0 (got {i})")
        self.stop_token_ids = tuple(self.stop_token_ids)

    def _validate_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, dict):
            raise InvalidParameterError(
                "logit_bias", f"logit_bias must map token ids to numbers (got {self.logit_bias!r})"
            )
        bias = {}
        for key, value in self.logit_bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise InvalidParameterError("logit_bias", f"logit_bias keys must be token ids (got {key!r})") from None
            if isinstance(key, (bool, float)) or token < 0:
                raise InvalidParameterError("logit_bias", f"logit_bias keys must be token ids >= 0 (got {key!r})")
            if not (-100 <= _float("logit_bias", value) <= 100):
                raise InvalidParameterError("logit_bias", f"logit_bias values must be in [-100, 100] (got {value})")
            bias[token] = float(value)
        self.logit_bias = bias

    def max_new_for(self, prompt_len: int, context_length: int) -> int:
        """How many tokens may be generated after a prompt of `prompt_len` tokens."""
        if self.max_length is not None and self.max_length <= prompt_len:
            raise InvalidParameterError(
                "max_length",
                f"max_length must be > the prompt length of {prompt_len} tokens (got {self.max_length})",
            )
        if prompt_len >= context_length:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens, which leaves no room in the model's "
                f"context of {context_length}",
                prompt_tokens=prompt_len,
                context_length=context_length,
            )
        limit = context_length - prompt_len
        if self.max_new_tokens is not None:
            limit = min(limit, self.max_new_tokens)
        if self.max_length is not None:
            limit = min(limit, self.max_length - prompt_len)
        return limit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, f"{name} must be an integer (got {value!r})")
    return value


def _float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(name, f"{name} must be a number (got {value!r})")
    return float(value)


# --- the warpers: each takes 1-D (or [B, V]) float logits and returns them with some set to -inf ---


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th), as HF's TopKLogitsWarper."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p (at least one), row by row:
    HF's TopPLogitsWarper, by the sampler's own `top_p_candidates`."""
    rows = logits.reshape(-1, logits.size(-1))
    kept = torch.zeros_like(rows, dtype=torch.bool)
    for row, keep in zip(rows, kept):
        keep[torch.from_numpy(top_p_candidates((row - row.max()).exp().cpu().numpy(), p))] = True
    return logits.masked_fill(~kept.view_as(logits), -math.inf)


def top_p_candidates(w: np.ndarray, p: float) -> np.ndarray:
    """The ids of the tokens top-p keeps, most likely first, from 1-D weights: probabilities up to a common
    factor (the sampler's exp((logits - max) / temperature), whose largest is 1).

    The rule is HF's TopPLogitsWarper's: with the probabilities in ascending order, drop each token whose
    cumulative probability is <= 1 - p, the most likely token never. A token's cumulative probability is the
    total less the mass of the tokens ranked above it, so only the tokens that can be kept need ordering: those
    above a threshold that together hold more than p of the mass (the threshold tried at 1e-4 and 1e-8 of the
    largest weight, else every token with any weight); a token below them has at least that mass above it.
    At temperature 0.7 that leaves a few to a few hundred of SmolLM2's 49152 tokens: ~0.1 ms a token here,
    where torch's topk of the 64 largest took ~0.2 ms and a full sort 2-5 ms. The kept set is HF's, except
    where a token's cumulative probability is within float rounding of 1 - p, and among tokens tied at the
    cut, where the order of a sort decides.
    """
    total = w.sum(dtype=np.float64)  # float64 sums: a long tail adds up without losing its small shares
    largest = w.max()
    for cut in (1e-4, 1e-8, 0.0):
        ids = np.flatnonzero(w > cut * largest)
        if cut == 0.0 or w[ids].sum(dtype=np.float64) > total * (p + 1e-6):  # the margin covers rounding
            break
    weights = w[ids]
    order = np.argsort(-weights, kind="stable")
    ids, mass = ids[order], weights[order].astype(np.float64)
    above = np.cumsum(mass) - mass  # the mass of the tokens ranked above each one
    keep = ((total - above) / total).astype(np.float32) > np.float32(1 - p)  # as HF: float32 against 1 - p
    keep[0] = True
    return ids[keep]


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's (HF's MinPLogitsWarper), row by row
    by the sampler's own `min_p_keep`."""
    probs = logits.softmax(dim=-1).reshape(-1, logits.size(-1)).cpu().numpy()
    kept = torch.from_numpy(np.stack([min_p_keep(row, min_p) for row in probs])).to(logits.device)
    return logits.masked_fill(~kept.view_as(logits), -math.inf)


def min_p_keep(w: np.ndarray, min_p: float) -> np.ndarray:
    """Which tokens min-p keeps, from 1-D probabilities (or weights proportional to them): those at least
    min_p times the largest, and the largest always."""
    keep = w >= min_p * w.max()
    keep[w.argmax()] = True
    return keep


class TokenSampler:
    """Chooses the next token for ONE sequence; holds that sequence's history, counts and RNG."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int):
        self.params = params.validate()
        self.vocab_size = vocab_size
        self.history: list[int] = []  # prompt + generated ids (the n-gram ban looks back over both)
        self.prompt_len = len(prompt_ids)
        self._seen = torch.zeros(vocab_size, dtype=torch.bool)  # in prompt or generated: repetition penalty
        self._counts = torch.zeros(vocab_size, dtype=torch.float32)  # generated only: presence/frequency
        self._ngrams: dict[tuple[int, ...], set[int]] = {}  # (n-1)-gram -> tokens that followed it
        self._rng: np.random.Generator | None = None  # uniform numbers for the draws (seeded), made at the first draw
        self._buffer: torch.Tensor | None = None  # processed_logits' output, reused from token to token

        self._bias_ids = self._bias_values = None
        self.bias_arrays: tuple[np.ndarray, np.ndarray] | None = None
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= vocab_size]
            if bad:
                raise InvalidParameterError(
                    "logit_bias", f"logit_bias token ids must be < vocab size {vocab_size} (got {bad[0]})"
                )
            self._bias_ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
            self._bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
            self.bias_arrays = self._bias_ids.numpy().copy(), self._bias_values.numpy().copy()  # sample_batch's

        for t in prompt_ids:
            self._record(t)
        self._seen[[t for t in prompt_ids if 0 <= t < vocab_size]] = True

    @property
    def generated(self) -> list[int]:
        return self.history[self.prompt_len :]

    def _record(self, token: int) -> None:
        """Extend the history by one token and update the n-gram table."""
        self.history.append(token)
        n = self.params.no_repeat_ngram_size
        if n and len(self.history) >= n:
            key = tuple(self.history[len(self.history) - n : -1])
            self._ngrams.setdefault(key, set()).add(token)

    def accept(self, token: int) -> None:
        """Record a generated token (done by __call__; call it yourself for a token you forced)."""
        self._record(token)
        if 0 <= token < self.vocab_size:
            if self._seen.device.type == "cpu":  # through NumPy views: torch's indexing took ~40 us a token
                self._seen.numpy()[token] = True
                self._counts.numpy()[token] += 1
            else:
                self._seen[token] = True
                self._counts[token] += 1

    def _to(self, device: torch.device) -> None:
        """Move the state tensors next to the logits (once, at the first step on a new device)."""
        self._seen, self._counts = self._seen.to(device), self._counts.to(device)
        if self._bias_ids is not None:
            self._bias_ids, self._bias_values = self._bias_ids.to(device), self._bias_values.to(device)

    def processed_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after bias, penalties and bans, before temperature, as float32 in the sampler's own
        buffer: valid until its next call (a fresh 200 KB tensor a token cost page faults and cache misses)."""
        p, V = self.params, self.vocab_size
        if self._seen.device != logits.device:
            self._to(logits.device)
        if self._buffer is None or self._buffer.shape != logits.shape or self._buffer.device != logits.device:
            self._buffer = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        x = self._buffer.copy_(logits)
        if x.numel() > V:
            x[V:] = -math.inf  # a padded vocabulary's extra rows are not tokens
        v = x[:V]  # a view: in-place edits to v edit x
        if self._bias_ids is not None:
            v.index_add_(0, self._bias_ids, self._bias_values)
        if p.repetition_penalty != 1.0:
            r = p.repetition_penalty
            v.copy_(torch.where(self._seen, torch.where(v < 0, v * r, v / r), v))
        if p.presence_penalty or p.frequency_penalty:
            v -= self._counts * p.frequency_penalty + (self._counts > 0).float() * p.presence_penalty
        if p.no_repeat_ngram_size:
            self._ban_repeated_ngrams(v)
        return x

    def _ban_repeated_ngrams(self, v: torch.Tensor) -> None:
        """Set to -inf every token that would complete an n-gram already in the history (HF semantics)."""
        n = self.params.no_repeat_ngram_size
        if len(self.history) < n - 1:
            return
        banned = self._ngrams.get(tuple(self.history[len(self.history) - (n - 1) :]))
        if not banned:
            return
        idx = torch.tensor([t for t in banned if 0 <= t < self.vocab_size], dtype=torch.long, device=v.device)
        before = v[idx]
        v[idx] = -math.inf
        if not (v > -math.inf).any():  # the ban left nothing to choose: better a repeat than a crash
            v[idx] = before

    @property
    def penalized(self) -> bool:
        """Whether a repetition, presence or frequency penalty or an n-gram ban changes the logits."""
        p = self.params
        return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.no_repeat_ngram_size)

    @property
    def argmax_only(self) -> bool:
        """Greedy, with no processing but logit_bias: the token is the argmax of the biased logits."""
        return self.params.greedy and not self.penalized

    @property
    def unprocessed(self) -> bool:
        """No logit_bias, penalty or n-gram ban: the raw logits go straight to the argmax or the draw."""
        return self._bias_ids is None and not self.penalized

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick the next token from 1-D logits [V >= vocab_size], record it and return it."""
        p = self.params
        raw = self.unprocessed and logits.device.type == "cpu" and logits.dtype == torch.float32
        x = logits[: self.vocab_size] if raw else self.processed_logits(logits)  # the raw row is only read
        token = argmax(x) if p.greedy else self._sample_token(x)
        if token is None:  # the NumPy path, which changes its logits in place: the sampler's own copy
            token = self._sample(self.processed_logits(logits) if raw else x)
        self.accept(token)
        return token

    def _sample_token(self, x: torch.Tensor) -> int | None:
        """The draw in one call to gptchat's kernel (kernels/sampling.cpp), where it is loaded and can take
        it: CPU float32 logits, no top-k; else (or for NaN or infinite logits) None."""
        p = self.params
        ops = kernels.loaded()
        if ops is None or p.top_k or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
            return None
        token = ops.sample_token(x, self.vocab_size, p.temperature, p.top_p, p.min_p, self._uniform())
        return token if token >= 0 else None

    def _uniform(self) -> float:
        """The next uniform number in [0, 1) of this sequence's (seeded) generator."""
        if self._rng is None:
            self._rng = np.random.default_rng(None if self.params.seed is None else self.params.seed & 0xFFFF_FFFF_FFFF_FFFF)
        return self._rng.random()

    def _sample(self, x: torch.Tensor) -> int:
        """Draw from processed logits x (the sampler's own buffer: changed in place).

        After the shift and the temperature, the work is on small arrays or single passes, done in NumPy on
        the host: right after a decode step, which streams ~100 MB through the caches, each torch op cost
        20-40 us of dispatch here, and the draw alone took ~8 of them."""
        p = self.params
        x.sub_(x.max()).div_(p.temperature)  # shifting first keeps a tiny temperature from overflowing
        if p.top_k:
            x = apply_top_k(x, p.top_k)
        w = x.exp_().cpu().numpy()  # the probabilities times a common factor (the largest is 1): no softmax
        candidates = None
        if p.top_p < 1.0:  # the draw, and min-p, need only the tokens top-p keeps (often a few dozen)
            candidates = top_p_candidates(w, p.top_p)
            w = w[candidates]
        if p.min_p > 0.0:
            w = np.where(min_p_keep(w, p.min_p), w, 0.0)
        token = draw(w, self._uniform())
        return int(candidates[token]) if candidates is not None else token


def argmax(x: torch.Tensor) -> int:
    """The index of the largest value of 1-D x (the first, if tied; NaN counts as largest, as torch's). On the
    CPU through NumPy: torch's argmax took ~60 us over a 49152-token vocabulary here, NumPy's ~5."""
    return int(x.numpy().argmax()) if x.device.type == "cpu" else int(x.argmax())


DRAW_BLOCK = 256  # tokens per block in draw's two-level search


def draw(w: np.ndarray, u: float) -> int:
    """One token drawn from 1-D probabilities, or weights proportional to them, by inverting their cumulative
    sum at a uniform number: the first token whose cumulative weight exceeds u * total. The cumulative sum
    is taken in two levels, over blocks of DRAW_BLOCK tokens and then within the one block the number falls
    in: over a 49152-token vocabulary ~0.05 ms here, where a cumulative sum of every token took 0.13 ms
    (torch) to 0.24 ms (NumPy) and torch.multinomial ~1.7 ms. Float64 sums keep small weights their share.
    Up to DRAW_BLOCK weights (what top-p leaves, usually) take one level: the same token, in 3 NumPy calls
    where the two levels made 12; right after a decode step each cost 10-30 us here."""
    if w.size <= DRAW_BLOCK:
        cum = np.cumsum(w, dtype=np.float64)
        i = int(np.searchsorted(cum, u * cum[-1], side="right"))
        # u * total may round up to the total: then the last token with any weight
        return i if i < w.size else int(np.searchsorted(cum, cum[-1], side="left"))
    starts = np.arange(0, w.size, DRAW_BLOCK)
    sums = np.add.reduceat(w, starts, dtype=np.float64)
    cum = np.cumsum(sums)
    target = u * cum[-1]
    # the last block with any weight: u * total may round up to (or past) the end
    b = min(int(np.searchsorted(cum, target, side="right")), int(np.flatnonzero(sums)[-1]))
    block = w[starts[b] : starts[b] + DRAW_BLOCK]
    within = np.cumsum(block, dtype=np.float64)
    # from the block's start: at least 0 (a zero-weight token is never the first whose sum exceeds it)
    rest = max(target - (cum[b] - sums[b]), 0.0)
    i = min(int(np.searchsorted(within, rest, side="right")), int(np.flatnonzero(block)[-1]))
    return int(starts[b]) + i


def sample_batch(samplers: list[TokenSampler], logits: torch.Tensor) -> list[int]:
    """One token per sequence of a batch: row i of logits [B, V] goes to samplers[i], and each sampler records
    its token. Rows whose sampler only takes the argmax (`argmax_only`: greedy, at most a logit_bias) are
    done together, in one NumPy argmax over their rows, with each row's bias added to its few entries and
    taken off again: the same tokens as their samplers give one by one (float32 additions, NumPy's argmax),
    without copying each row (200 KB) and ~6 small torch ops per row; at batch 8 that took ~1 ms a step."""
    together = [i for i, s in enumerate(samplers) if s.argmax_only]
    tokens: list[int | None] = [None] * len(samplers)
    vocab = {samplers[i].vocab_size for i in together}
    if len(together) > 1 and len(vocab) == 1 and logits.device.type == "cpu" and logits.dtype == torch.float32:
        x, V = logits.detach().numpy(), vocab.pop()
        biased = []
        for i in together:
            if samplers[i].bias_arrays is not None:
                ids, values = samplers[i].bias_arrays
                biased.append((i, ids, x[i, ids]))  # fancy indexing: a copy
                x[i, ids] += values
        try:
            rows = x[:, :V] if len(together) == len(samplers) else x[together, :V]
            for i, token in zip(together, rows.argmax(axis=1).tolist()):
                tokens[i] = token
                samplers[i].accept(token)
        finally:
            for i, ids, before in biased:
                x[i, ids] = before
    return [samplers[i](logits[i]) if token is None else token for i, token in enumerate(tokens)]
