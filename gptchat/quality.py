"""The quality guard: how far a quantized model strays from its float32 original.

Two figures, both on fixed English text:

    mean KL divergence   KL(p_float || p_quant) of the next-token distributions, averaged over the positions
                         of FIXED_TEXT: 0 for identical models; how much the quantized model's choices move
    perplexity           exp(mean negative log-likelihood) of HELD_OUT_TEXT: how well each model still
                         predicts text, compared as a ratio to the float32 model's

Tokens are fed GUARD_ROWS at a time through the KV cache, so the quantized layers run through the same
kernels that decoding uses (gptchat/kernels, or PyTorch's with bfloat16 activations), not only the float32
prompt path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import GPT
from .quantize import SMALL_BATCH

GUARD_ROWS = SMALL_BATCH  # rows per forward call: the decode kernels' path

FIXED_TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. The farmers "
    "had seen floods before, so they moved the animals to the hill, carried the grain into the lofts and waited. "
    "Children watched from the church steps as boats drifted down the main street, and an old woman sold hot "
    "bread to anyone who could reach her window. When the rain finally stopped, the sun came out over a town "
    "that smelled of mud and wet wood. It took three weeks to dry the houses, but nobody was hurt, and in the "
    "autumn the soil the river had left behind gave the best harvest anyone could remember."
)
HELD_OUT_TEXT = (
    "A good recipe for bread needs only four things: flour, water, salt and yeast. Mix the flour and the water "
    "first and let them rest for half an hour, so the flour can drink. Then add the salt and the yeast and knead "
    "the dough until it is smooth and springs back when you press it with a finger. Leave it in a warm place "
    "until it has doubled in size, shape it gently into a loaf, and let it rise once more. Bake it in a very hot "
    "oven for about forty minutes, until the crust is deep brown and the loaf sounds hollow when you tap its "
    "bottom. Wait until it has cooled before you cut it, or the inside will be gummy."
)


@dataclass
class QualityReport:
    mean_kl: float  # nats per token, KL(float32 || quantized) over FIXED_TEXT
    perplexity: float  # the quantized model's, on HELD_OUT_TEXT
    reference_perplexity: float  # the float32 model's, on HELD_OUT_TEXT

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity


@torch.inference_mode()
def token_logits(model: GPT, ids: list[int], rows: int = GUARD_ROWS) -> torch.Tensor:
    """Float32 logits [len(ids), vocab] for every position, computed `rows` tokens per forward call."""
    cache = model.new_cache(1, len(ids))  # as decoding uses it (float16 for quantized models)
    parts = [model(torch.tensor([ids[i : i + rows]]), cache=cache)[0] for i in range(0, len(ids), rows)]
    return torch.cat(parts).float()


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(logits)), in nats."""
    ref_logp, logp = F.log_softmax(reference, dim=-1), F.log_softmax(logits, dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ids[1:] given the logits of the positions before them."""
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


def compare(reference: GPT, model: GPT, tokenizer, fixed: str = FIXED_TEXT, held_out: str = HELD_OUT_TEXT) -> QualityReport:
    """Mean KL of `model` from `reference` on `fixed`, and both perplexities on `held_out`."""
    n = reference.config.max_seq_len  # a small model sees the start of the texts
    fixed_ids, held_ids = tokenizer.encode(fixed)[:n], tokenizer.encode(held_out)[:n]
    kl = mean_kl(token_logits(reference, fixed_ids), token_logits(model, fixed_ids))
    return QualityReport(kl, perplexity(token_logits(model, held_ids), held_ids),
                         perplexity(token_logits(reference, held_ids), held_ids))
