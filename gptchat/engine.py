"""Generation: prefill the prompt, then decode one token at a time from the KV cache.

`Engine.stream` yields text deltas as they are decoded (never half a UTF-8 character, never part of a
stop string); `Engine.generate` collects them. The engine keeps the KV cache of its last sequence, so
the next prompt only pays for the tokens after the prefix it shares with it: in a chat, each turn
re-sends the whole history (the article's "input + previous reply -> next reply") but only the new
message is computed. `Engine.generate_batch` decodes several prompts together, left-padded, in a
`DecodeBatch`, which the server's scheduler also uses to let requests join and leave between steps.

Log-probabilities (`SamplingParams(logprobs=True, top_logprobs=k)`) are those of the model's own
distribution, log_softmax of the raw logits, before logit_bias, penalties and temperature (as vLLM
reports by default): they say what the model thinks, whatever the sampler then did with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .checkpoints import LoadedModel
from .compiled import CompiledBatchDecoder, CompiledDecoder
from .cpu import cpu_has_fast_bf16
from .errors import ContextLengthError
from .model import KVCache
from .sampling import SamplingParams, TokenSampler, sample_batch
from .streaming import IncrementalDetokenizer, StopStringMatcher

PREFILL_CHUNK = 512  # long prompts are prefilled in chunks so attention scores stay small


def prefill_dtype() -> torch.dtype:
    """The dtype prompts are computed in: bfloat16 where the CPU has fast bf16 matmuls, else float32.
    GPTCHAT_PREFILL_DTYPE=float32 (or bfloat16) overrides; decoding is unaffected."""
    choice = os.environ.get("GPTCHAT_PREFILL_DTYPE", "").strip().lower()
    if choice in ("float32", "fp32"):
        return torch.float32
    if choice in ("bfloat16", "bf16"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


ONEDNN_CACHE_CAPACITY = 16  # oneDNN primitives each of its two caches keeps (bound_onednn_caches)


def bound_onednn_caches() -> None:
    """Cap the caches of the oneDNN primitives that bfloat16 prompts build: oneDNN's own and ideep's (PyTorch's
    wrapper around it) each keep 1024 by default. A primitive is built per matmul shape, and a prompt's length
    is part of the shape, so every chat turn or request of a new length added ~3 MiB that stayed: 43 prompts
    of distinct lengths took an int8 SmolLM2 process from 406 to 547 MiB; capped, to 429. A new length builds
    its primitives either way (its first prompt ~2-4% slower), so a chat loses nothing. Both caches read their
    capacity from the environment when they build their first primitive: this runs before every bfloat16
    prompt, and a value the user set wins. (Training, which reuses ~15 shapes at every step, usually starts
    before any prompt and keeps the defaults.)"""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(ONEDNN_CACHE_CAPACITY))


def prompt_precision():
    """The autocast context prompts run in: bfloat16 where prefill_dtype() says so (matmuls, attention; the
    quantized layers then dequantize to bfloat16 for prompts of 64 tokens or more), else none."""
    bf16 = prefill_dtype() == torch.bfloat16
    if bf16:
        bound_onednn_caches()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


CACHE_START = 1024  # positions asked for up front (the CPU reserves more: GPT.new_cache); then it doubles
JOIN_HEADROOM = 128  # free positions a batch's cache gets when a row joins


@dataclass
class Delta:
    """A piece of streamed output: new text, the tokens sampled since the last delta, and at the end why it stopped."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end-of-turn token or stop string) or "length"
    # with SamplingParams.logprobs: one entry per token in token_ids, in the OpenAI chat shape
    # {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}
    logprobs: list[dict] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the reply's tokens (without the end-of-turn token)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, the end-of-turn token included


class SequenceOutput:
    """The output side of one sequence: its sampler, detokenizer and stop strings, and what it produced."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int, engine: "Engine"):
        self.prompt_len = len(prompt_ids)
        self.budget = budget
        self.stop_ids = set(engine.tokenizer.eos_ids) | set(params.stop_token_ids)
        self.sampler = TokenSampler(params, prompt_ids, engine.vocab_size)
        self.detok = IncrementalDetokenizer(engine.decode, prompt_ids)  # the prompt gives the first token its spacing
        self.stopper = StopStringMatcher(params.stop)
        self.tokenizer = engine.tokenizer
        self.logprobs, self.top_logprobs = params.logprobs, params.top_logprobs
        self.parts: list[str] = []
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def step(self, logits: torch.Tensor) -> Delta:
        """Sample the next token from `logits` and turn it into a Delta (finish_reason set on the last)."""
        return self.take(self.sampler(logits), logits)

    def take(self, token: int, logits: torch.Tensor) -> Delta:
        """The Delta of `token`, which this output's sampler chose from `logits` (and recorded)."""
        if token in self.stop_ids:
            return self._finish(Delta(""), "stop")
        self.tokens.append(token)
        text, stopped = self.stopper.push(self.detok.push(token))
        delta = Delta(text, [token], logprobs=[self._logprob_entry(logits, token)] if self.logprobs else None)
        if stopped:
            self.parts.append(text)
            self.finish_reason = delta.finish_reason = "stop"
            return delta
        if len(self.tokens) >= self.budget:
            return self._finish(delta, "length")
        self.parts.append(text)
        return delta

    def _logprob_entry(self, logits: torch.Tensor, token: int) -> dict:
        """`token`'s log-probability under the model's raw distribution, and the most likely alternatives."""
        logp = torch.log_softmax(logits[: self.sampler.vocab_size].float(), dim=-1)
        entry = self._token_info(token, float(logp[token]))
        values, ids = logp.topk(self.top_logprobs) if self.top_logprobs else (logp[:0], logp[:0].long())
        entry["top_logprobs"] = [self._token_info(int(i), float(v)) for v, i in zip(values, ids)]
        return entry

    def _token_info(self, token: int, logprob: float) -> dict:
        return {"token": self.tokenizer.decode([token], skip_special_tokens=False), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token))}

    def _finish(self, delta: Delta, reason: str) -> Delta:
        """Release what the detokenizer and the stop matcher held back."""
        tail, stopped = self.stopper.push(self.detok.flush())
        delta.text += tail if stopped else tail + self.stopper.flush()
        delta.finish_reason = self.finish_reason = "stop" if stopped else reason
        self.parts.append(delta.text)
        return delta

    def result(self) -> GenerationResult:
        return GenerationResult(
            "".join(self.parts), self.tokens, self.finish_reason or "length", self.prompt_len, len(self.sampler.generated)
        )


class Engine:
    def __init__(self, lm: LoadedModel, compile: bool = False):
        """compile=True decodes through the compiled decode steps (gptchat/compiled.py), one for single
        sequences and one for batches: the first run for a model builds each (minutes, cached on disk) when
        it is first needed, and decoding falls back to eager if that fails."""
        self.lm = lm
        self.model = lm.model
        lm.model.prepare_kernels()  # quantized layers: into gptchat's kernel layout, all at once, on first use
        self.decoder = CompiledDecoder(lm.model) if compile else None
        self.batch_decoder = CompiledBatchDecoder(lm.model) if compile else None
        self.tokenizer = lm.tokenizer
        self.context_length = lm.config.max_seq_len
        self.vocab_size = min(lm.config.vocab_size, self.tokenizer.vocab_size)
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []  # the tokens whose keys/values are in _cache

    def prepare(self, batched: bool = False) -> None:
        """Load (or build) the compiled decode step now, so the wait comes before the first prompt; with
        batched, the batched step too (a server that runs several requests at once)."""
        if self.decoder is not None:
            self.decoder.load()
        if batched and self.batch_decoder is not None:
            self.batch_decoder.load()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check_fits(self, prompt_len: int, params: SamplingParams) -> int:
        """How many tokens may be generated; a clear error when the prompt leaves no room."""
        if prompt_len == 0:
            raise ContextLengthError("the prompt is empty", 0, self.context_length)
        if prompt_len >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens but the model's context holds {self.context_length}",
                prompt_len,
                self.context_length,
            )
        return params.max_new_for(prompt_len, self.context_length)

    @torch.inference_mode()
    def _prefill(self, prompt_ids: list[int], total: int) -> torch.Tensor:
        """Run the prompt through the model, reusing the cached prefix; return the last position's logits."""
        if self._cache is None:
            self._cache = self.model.new_cache(1, min(total, CACHE_START))
        shared = 0
        for a, b in zip(self._cached_ids, prompt_ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(prompt_ids) - 1)  # at least one token must run to give logits
        self._cache.truncate(shared)
        self._cached_ids = self._cached_ids[:shared]
        for start in range(shared, len(prompt_ids), PREFILL_CHUNK):
            chunk = prompt_ids[start : start + PREFILL_CHUNK]
            with prompt_precision():
                logits = self.model(torch.tensor([chunk]), cache=self._cache, last_only=True)
            self._cached_ids += chunk
        return logits[0, -1].float()

    @torch.inference_mode()
    def _decode_step(self, token: int) -> torch.Tensor:
        logits = self.decoder(token, self._cache) if self.decoder is not None else None
        if logits is None:  # eager (also when compiling failed)
            logits = self.model(torch.tensor([[token]]), cache=self._cache, last_only=True)[0, -1]
        self._cached_ids.append(token)
        return logits

    def start(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> SequenceOutput:
        """Validate the request (eagerly, so errors come before any output) and set up its output side."""
        params = (params or SamplingParams()).validate()
        return SequenceOutput(list(prompt_ids), params, self.check_fits(len(prompt_ids), params), self)

    def run(self, prompt_ids: Sequence[int], out: SequenceOutput) -> Iterator[Delta]:
        """Prefill, then decode until `out` finishes. Closing the iterator stops generation at once."""
        prompt_ids = list(prompt_ids)
        logits = self._prefill(prompt_ids, len(prompt_ids) + out.budget)
        while True:
            delta = out.step(logits)
            yield delta
            if delta.finish_reason:
                return
            logits = self._decode_step(delta.token_ids[-1])

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Deltas of the reply as they are decoded; the last one carries finish_reason."""
        return self.run(prompt_ids, self.start(prompt_ids, params))

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> GenerationResult:
        out = self.start(prompt_ids, params)
        for _ in self.run(prompt_ids, out):
            pass
        return out.result()

    @torch.inference_mode()
    def generate_batch(
        self, prompts: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[GenerationResult]:
        """Decode several prompts together: left-padded and masked, each with its own sampling params.

        Finished rows leave the batch. A greedy row gives the same tokens as `generate` alone.
        """
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        params = [p.validate() for p in params]
        outs = [SequenceOutput(list(p), q, self.check_fits(len(p), q), self) for p, q in zip(prompts, params)]
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_id or 0
        ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts])
        key_mask = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts])
        positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
        cache = self.model.new_cache(len(prompts), min(longest + max(o.budget for o in outs), CACHE_START))
        logits = self.model(ids, cache=cache, positions=positions, key_mask=key_mask, last_only=True)[:, -1]
        batch = DecodeBatch(self.model, self.decoder, self.batch_decoder)
        batch.join(cache, key_mask, outs, [out.step(row) for out, row in zip(outs, logits)])
        while batch:
            batch.step()
        return [o.result() for o in outs]

    def prefill_chunk(self, cache: KVCache, chunk: Sequence[int]) -> torch.Tensor:
        """Append one chunk of a single sequence's prompt to its cache; the logits after its last token."""
        with prompt_precision():
            return self.model(torch.tensor([list(chunk)]), cache=cache, last_only=True)[0, -1].float()


class DecodeBatch:
    """Sequences that decode together, one row each of one KV cache: continuous batching's core.

    Rows are left-padded so that all end at the cache's last column; the key mask hides the padding and
    each row keeps its own positions (keys are stored after RoPE, so the column a key sits in does not
    matter, only whether it is masked). Rows join with the cache of their prefill and leave as soon as
    they finish; columns that only padding uses any more are then dropped. A batch of one unpadded row
    (a single client) decodes through the compiled step when there is one (`decoder`), a batch of several
    through the compiled batched step (`batch_decoder`).
    """

    def __init__(self, model, decoder: CompiledDecoder | None = None, batch_decoder: CompiledBatchDecoder | None = None):
        self.model = model
        self.decoder, self.batch_decoder = decoder, batch_decoder
        self.outs: list[SequenceOutput] = []
        self.cache: KVCache | None = None
        self.key_mask = torch.zeros(0, 0, dtype=torch.bool)  # [B, S]: True where a row has a real key
        self.positions = torch.zeros(0, 1, dtype=torch.long)  # [B, 1]: each row's next position
        self.tokens: list[int] = []  # each row's last sampled token, fed at the next step

    def __len__(self) -> int:
        return len(self.outs)

    def join(self, cache: KVCache, key_mask: torch.Tensor, outs: list[SequenceOutput], deltas: list[Delta]):
        """Add the rows of a prefilled `cache` (`key_mask` [b, cache.length]) whose first deltas are `deltas`;
        rows already finished by their first token do not join."""
        keep = [i for i, d in enumerate(deltas) if not d.finish_reason]
        if not keep:
            return
        if len(keep) < len(deltas):
            cache, key_mask = _keep_rows(cache, key_mask, keep)
        outs, deltas = [outs[i] for i in keep], [deltas[i] for i in keep]
        positions = key_mask.sum(1, keepdim=True)
        if self.cache is None:
            self.cache, self.key_mask = cache, key_mask
        else:
            self.cache, self.key_mask = _stack_rows(self.cache, self.key_mask, cache, key_mask)
        self.positions = torch.cat([self.positions, positions])
        self.outs += outs
        self.tokens += [d.token_ids[-1] for d in deltas]

    def leave(self, rows: list[int]) -> None:
        """Remove these rows (finished, or their client left)."""
        keep = [i for i in range(len(self)) if i not in set(rows)]
        if not keep:
            self.__init__(self.model, self.decoder, self.batch_decoder)
            return
        self.cache, self.key_mask = _keep_rows(self.cache, self.key_mask, keep)
        self.positions = self.positions[keep]
        self.outs = [self.outs[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]

    @torch.inference_mode()
    def step(self) -> list[tuple[SequenceOutput, Delta]]:
        """Decode one token for every row; finished rows leave. Returns each row's (output, delta)."""
        n = len(self)
        self.key_mask = torch.cat([self.key_mask, torch.ones(n, 1, dtype=torch.bool)], dim=1)
        logits = None
        if n == 1 and self.decoder is not None and bool(self.key_mask.all()):  # no padding: pos = cache length
            logits = self.decoder(self.tokens[0], self.cache)
            logits = logits[None] if logits is not None else None
        if logits is None:
            tokens = torch.tensor(self.tokens).view(n, 1)
            if n > 1 and self.batch_decoder is not None:
                logits = self.batch_decoder(tokens, self.positions, self.key_mask, self.cache)
            if logits is None:
                logits = self.model(tokens, cache=self.cache, positions=self.positions, key_mask=self.key_mask,
                                    last_only=True)[:, -1]
        self.positions = self.positions + 1
        tokens = sample_batch([out.sampler for out in self.outs], logits)
        stepped = [(out, out.take(token, row)) for out, token, row in zip(self.outs, tokens, logits)]
        self.tokens = [d.token_ids[-1] if d.token_ids else -1 for _, d in stepped]
        finished = [i for i, (_, d) in enumerate(stepped) if d.finish_reason]
        if finished:
            self.leave(finished)
        return stepped


def _keep_rows(cache: KVCache, key_mask: torch.Tensor, rows: list[int]):
    """Keep these rows of a cache, dropping leading columns that are padding in every row kept."""
    cache.select(rows)
    key_mask = key_mask[rows]
    unused = int((~key_mask).all(0).long().cumprod(0).sum())
    if unused:  # dense copies: the compiled batched step reads each layer's cache as a dense tensor
        cache.drop_front(unused)
        key_mask = key_mask[:, unused:]
    return cache, key_mask


def _stack_rows(a: KVCache, mask_a: torch.Tensor, b: KVCache, mask_b: torch.Tensor):
    """One cache holding the rows of `a` then those of `b`, right-aligned (the shorter is left-padded)."""
    width = max(a.length, b.length)
    room = width + JOIN_HEADROOM  # so that the next steps do not reallocate at once
    out = KVCache(a.config, a.batch_size + b.batch_size, room, dtype=a.dtype, device=a.device)
    mask = torch.zeros(out.batch_size, width, dtype=torch.bool)
    for src, src_mask, rows in ((a, mask_a, slice(0, a.batch_size)), (b, mask_b, slice(a.batch_size, None))):
        n = src.length
        out.k[:, rows, :, width - n : width] = src.k[:, :, :, :n]
        out.v[:, rows, :, width - n : width] = src.v[:, :, :, :n]
        mask[rows, width - n :] = src_mask
    out.length = width
    return out, mask
