"""Sampling: parameter validation, determinism, and the processors against Hugging Face's as the oracle."""

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gptchat import kernels, sampling
from gptchat.errors import ContextLengthError, InvalidParameterError
from gptchat.sampling import (
    DRAW_BLOCK,
    SamplingParams,
    TokenSampler,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    draw,
    sample_batch,
)

V = 64
NAN = float("nan")


@pytest.fixture(params=["numpy", "kernel"])
def draw_path(request, monkeypatch):
    """Run a test with each way a sampled token is drawn: the NumPy steps, or one call to gptchat's kernel
    (kernels/sampling.cpp; skipped where it cannot be built)."""
    if request.param == "kernel":
        ops = kernels.ops()
        if ops is None:
            pytest.skip("gptchat's kernels are not available on this machine")
        monkeypatch.setattr(sampling.kernels, "loaded", lambda: ops)
    else:
        monkeypatch.setattr(sampling.kernels, "loaded", lambda: None)
    return request.param


def random_logits(n, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 3


# --- validation ---

BAD = [
    ("max_new_tokens", 0),
    ("max_new_tokens", 2.5),
    ("max_length", 0),
    ("temperature", -1.0),
    ("temperature", NAN),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("top_k", -1),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", NAN),
    ("min_p", 1.0),
    ("min_p", -0.1),
    ("min_p", NAN),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", NAN),
    ("presence_penalty", 2.5),
    ("presence_penalty", NAN),
    ("frequency_penalty", -3.0),
    ("frequency_penalty", NAN),
    ("no_repeat_ngram_size", -1),
    ("stop", [""]),
    ("stop", ["ok", ""]),
    ("stop", [f"s{i}" for i in range(17)]),
    ("stop_token_ids", [-1]),
    ("seed", 1.5),
    ("logit_bias", {5: 101.0}),
    ("logit_bias", {5: -100.5}),
    ("logit_bias", {5: NAN}),
    ("logit_bias", {"x": 1.0}),
    ("logit_bias", {-3: 1.0}),
]


@pytest.mark.parametrize("param,value", BAD)
def test_bad_values_raise_naming_the_param(param, value):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**{param: value}).validate()
    assert err.value.param == param
    assert param in str(err.value) and "\n" not in str(err.value)


def test_good_values_validate_and_normalise():
    p = SamplingParams(
        max_new_tokens=None, temperature=0, top_p=1.0, min_p=0.5, presence_penalty=-2, frequency_penalty=2,
        stop="###", stop_token_ids=[2], seed=-5, logit_bias={"7": 100, 3: -100.0},
    )
    assert p.validate() is p
    assert p.stop == ("###",) and p.stop_token_ids == (2,)
    assert p.logit_bias == {7: 100.0, 3: -100.0}
    assert SamplingParams(stop=[f"s{i}" for i in range(16)]).validate()


def test_logit_bias_token_must_be_in_vocab():
    with pytest.raises(InvalidParameterError) as err:
        TokenSampler(SamplingParams(logit_bias={V: 1.0}), [], V)
    assert err.value.param == "logit_bias"


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


# --- length budget ---


def test_max_new_for():
    assert SamplingParams(max_new_tokens=256).max_new_for(10, 1024) == 256
    assert SamplingParams(max_new_tokens=256).max_new_for(900, 1024) == 124
    assert SamplingParams(max_new_tokens=None).max_new_for(10, 1024) == 1014
    assert SamplingParams(max_new_tokens=None, max_length=50).max_new_for(10, 1024) == 40
    assert SamplingParams(max_new_tokens=20, max_length=50).max_new_for(10, 1024) == 20
    assert SamplingParams(max_new_tokens=100, max_length=2000).max_new_for(10, 60) == 50


def test_max_length_not_above_prompt_raises():
    for max_length in (10, 5):
        with pytest.raises(InvalidParameterError) as err:
            SamplingParams(max_length=max_length).max_new_for(10, 1024)
        assert err.value.param == "max_length"


def test_prompt_filling_context_raises():
    with pytest.raises(ContextLengthError):
        SamplingParams().max_new_for(1024, 1024)


# --- determinism and greedy ---


def run(params, logits, prompt=(), vocab=V):
    sampler = TokenSampler(params, list(prompt), vocab)
    return [sampler(row) for row in logits]


def test_same_seed_same_tokens_different_seed_differs(draw_path):
    logits = random_logits(50) / 3  # flat enough that draws vary
    a = run(SamplingParams(seed=1234), logits)
    assert a == run(SamplingParams(seed=1234), logits)
    assert a != run(SamplingParams(seed=4321), logits)
    warped = SamplingParams(seed=7, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)
    assert run(warped, logits) == run(warped, logits)


def test_unseeded_samplers_are_random(draw_path):
    logits = torch.zeros(50, V)
    assert run(SamplingParams(), logits) != run(SamplingParams(), logits)


def test_temperature_zero_is_argmax_and_top_k_one_is_greedy():
    logits = random_logits(50)
    argmax = [int(row.argmax()) for row in logits]
    assert run(SamplingParams(temperature=0), logits) == argmax
    assert run(SamplingParams(top_k=1, seed=3), logits) == argmax
    assert run(SamplingParams(top_k=1, temperature=5.0), logits) == argmax


def test_greedy_ties_pick_lowest_id():
    logits = torch.zeros(V)
    logits[[9, 4, 30]] = 1.0
    assert run(SamplingParams(temperature=0), [logits]) == [4]


def test_padded_vocab_rows_are_never_chosen(draw_path):
    logits = random_logits(20, vocab=V + 16)
    logits[:, V:] = 100.0
    assert all(t < V for t in run(SamplingParams(temperature=0), logits))
    assert all(t < V for t in run(SamplingParams(seed=0), logits))
    assert torch.isinf(TokenSampler(SamplingParams(), [], V).processed_logits(logits[0])[V:]).all()


def test_tiny_temperature_does_not_overflow(draw_path):
    logits = random_logits(20)
    assert run(SamplingParams(temperature=1e-30, seed=0), logits) == [int(r.argmax()) for r in logits]


def test_sample_batch_and_generated():
    logits = random_logits(3)
    samplers = [TokenSampler(SamplingParams(temperature=0), [1, 2], V) for _ in range(3)]
    tokens = sample_batch(samplers, logits)
    assert tokens == [int(r.argmax()) for r in logits]
    assert [s.generated for s in samplers] == [[t] for t in tokens]
    assert samplers[0].history == [1, 2, tokens[0]]


def test_sample_batch_gives_each_samplers_own_tokens():
    """Greedy rows with at most a logit_bias are picked together; every row gets the token its sampler picks
    alone, step after step, over a padded vocabulary, with ties and a NaN, and the logits stay as they were."""
    steps = random_logits(5 * 7, vocab=V + 8, seed=3).view(5, 7, V + 8)
    steps[:, :, V:] = 100.0  # padding columns are never tokens
    steps[1, 2, [3, 9]] = steps[1, 2].max() + 1  # a tie: the first wins
    steps[2, 4, 11] = float("nan")  # NaN counts as the largest, as in torch.argmax
    top = int(steps[0, 0, :V].argmax())
    params = [
        SamplingParams(temperature=0, logit_bias={top: -100, 5: 2.5}),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=1.3),  # processed on its own
        SamplingParams(temperature=0.8, seed=11),
        SamplingParams(top_k=1, logit_bias={7: 4.0}),
        SamplingParams(temperature=0, logit_bias={0: 100}),
        SamplingParams(temperature=0, logit_bias={1: -3.0}, logprobs=True),
    ]
    for rows in (list(range(7)), [0, 1, 4, 5, 6], [0, 3]):
        together = [TokenSampler(params[r], [1, 2], V) for r in rows]
        alone = [TokenSampler(params[r], [1, 2], V) for r in rows]
        for logits in steps[:, rows]:
            before = logits.clone()
            tokens = sample_batch(together, logits)
            torch.testing.assert_close(logits, before, rtol=0, atol=0, equal_nan=True)
            assert tokens == [sampler(row) for sampler, row in zip(alone, logits)]
        assert [s.history for s in together] == [s.history for s in alone]


def test_input_logits_are_not_modified(draw_path):
    logits = random_logits(1)[0]
    before = logits.clone()
    params = SamplingParams(repetition_penalty=1.3, logit_bias={1: 5}, presence_penalty=1, no_repeat_ngram_size=1)
    run(params, [logits], [1, 2])
    assert torch.equal(logits, before)


# --- processors against Hugging Face ---


def test_repetition_penalty_matches_hf():
    logits = random_logits(10, seed=1)
    g = torch.Generator().manual_seed(2)
    for penalty in (1.3, 0.7):
        prompt = torch.randint(0, V, (12,), generator=g).tolist()
        sampler = TokenSampler(SamplingParams(repetition_penalty=penalty, seed=0), prompt, V)
        hf = RepetitionPenaltyLogitsProcessor(penalty)
        for row in logits:
            ids = torch.tensor([sampler.history])
            assert torch.equal(sampler.processed_logits(row), hf(ids, row[None].clone())[0])
            sampler(row)


def test_no_repeat_ngram_matches_hf():
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 3, 4):
        prompt = torch.randint(0, 6, (15,), generator=g).tolist()  # small id range: many repeats
        sampler = TokenSampler(SamplingParams(no_repeat_ngram_size=n, seed=n), prompt, V)
        hf = NoRepeatNGramLogitsProcessor(n)
        for row in random_logits(10, seed=n):
            row[6:] -= 50  # keep choices among the repeating ids
            ids = torch.tensor([sampler.history])
            ours, theirs = sampler.processed_logits(row), hf(ids, row[None].clone())[0]
            if torch.isinf(theirs).all():
                continue  # HF leaves nothing; we fall back (tested below)
            assert torch.equal(ours, theirs)
            sampler(row)


def test_no_repeat_ngram_breaks_a_loop():
    """Logits that always favour the cycle 0 1 2 0 1 2 ...; with the ban no 3-gram repeats."""
    cycle = 3

    def logits_after(prev):
        row = torch.zeros(V)
        row[(prev + 1) % cycle] = 10.0
        return row

    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, seed=0, no_repeat_ngram_size=3)
        sampler = TokenSampler(params, [0], V)
        prev = 0
        for _ in range(60):
            prev = sampler(logits_after(prev))
        seq = sampler.history
        grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
        assert len(grams) == len(set(grams))
    unbanned = TokenSampler(SamplingParams(temperature=0), [0], V)
    prev = 0
    for _ in range(10):
        prev = unbanned(logits_after(prev))
    assert unbanned.generated == [1, 2, 0] * 3 + [1]


def test_ban_of_every_token_falls_back():
    sampler = TokenSampler(SamplingParams(no_repeat_ngram_size=1, seed=0), [0, 1], 2)  # every id banned
    out = sampler.processed_logits(torch.tensor([1.0, 2.0]))
    assert torch.equal(out, torch.tensor([1.0, 2.0]))
    assert sampler(torch.tensor([1.0, 2.0])) in (0, 1)


@pytest.mark.parametrize("k", [1, 5, 40, V, V + 10])
def test_top_k_matches_hf(k):
    logits = random_logits(8, seed=k)
    logits[0, :10] = 1.0  # ties at the boundary
    assert torch.equal(apply_top_k(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_mask_matches_hf(p):
    logits = random_logits(16, seed=int(p * 1000))
    ours, theirs = apply_top_p(logits, p), TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours, theirs)
    assert (~torch.isinf(ours)).sum(-1).min() >= 1


@pytest.mark.parametrize("scale", [8.0, 1.0, 0.05, 0.0])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_top_p_matches_hf_over_a_real_vocabulary(scale, p):
    """49152 tokens (SmolLM2's vocabulary), from peaked to flat (scale 0: all tied), so that the sampler's
    search for the tokens worth ordering ends at each of its thresholds, and at the full sort."""
    logits = torch.randn(2, 49152, generator=torch.Generator().manual_seed(int(scale * 10 + p * 100))) * scale
    ours, theirs = apply_top_p(logits, p), TopPLogitsWarper(p)(None, logits.clone())
    if scale == 0.0:  # all tied: which of them are kept is the order of a sort, only how many is fixed
        assert torch.equal(torch.isinf(ours).sum(-1), torch.isinf(theirs).sum(-1))
    else:
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("tail,p", [(-10.0, 0.5), (-19.5, 0.99995)])
def test_top_p_reaches_into_a_long_tail(tail, p):
    """A few likely tokens and a long tail just below the sampler's first threshold (1e-4 of the top weight),
    or its second (1e-8), which together hold the mass top-p needs: the search goes past that threshold."""
    logits = torch.full((1, 49152), tail)
    logits[0, [5, 900, 40000]] = torch.tensor([0.0, -0.5, -1.0])
    weights = (logits[0] - logits.max()).exp()
    cut = 1e-4 if tail == -10.0 else 1e-8
    assert weights[weights > cut].sum() < p * weights.sum()  # the first (or second) threshold is not enough
    ours, theirs = apply_top_p(logits, p), TopPLogitsWarper(p)(None, logits.clone())
    kept, hf_kept = int((~torch.isinf(ours)).sum()), int((~torch.isinf(theirs)).sum())
    probs = weights.double().sort(descending=True).values / weights.double().sum()
    exact = int(((1 - (probs.cumsum(0) - probs)) > 1 - p).sum())  # the rule in float64
    assert (weights > cut).sum() < kept == exact
    # HF sums 49k probabilities in float32 (on CPUs with and without AVX-512, different roundings): the tail's
    # tokens are tied, so its cut may land a few tokens away
    assert abs(kept - hf_kept) <= 0.001 * kept, (kept, hf_kept)
    assert not torch.isinf(ours[0, [5, 900, 40000]]).any()


def test_draws_follow_the_probabilities(draw_path):
    """Seeded draws over temperature, top-p and min-p land on each kept token as often as its probability."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0] + [-20.0] * 56)
    params = SamplingParams(temperature=0.8, top_p=0.95, min_p=0.02, seed=11)
    x = TopPLogitsWarper(0.95)(None, (logits / 0.8)[None])
    x = MinPLogitsWarper(0.02)(None, x)[0]
    expected = x.softmax(dim=-1)
    sampler = TokenSampler(params, [], V)
    n = 20000
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(n)]), minlength=V).double()
    assert set(counts.nonzero().flatten().tolist()) == set(expected.nonzero().flatten().tolist())
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 4 * sigma + 1e-9).all(), (counts / n, expected)


def test_draws_over_a_real_vocabulary_follow_the_weights():
    """SmolLM2's 49152 tokens (192 of draw's blocks), the mass on a few tokens in different blocks, some at a
    block's first or last place, the rest of the vocabulary without weight: drawn as often as their share."""
    w = np.zeros(49152, dtype=np.float32)
    chosen = [0, 255, 256, 1000, 30000, 49151]
    w[chosen] = [0.1, 0.25, 0.05, 0.3, 0.2, 0.1]
    rng = np.random.default_rng(5)
    n = 20000
    counts = np.bincount([draw(w, rng.random()) for _ in range(n)], minlength=w.size)
    assert set(np.flatnonzero(counts)) == set(chosen)
    share = w[chosen] / w.sum()
    assert (np.abs(counts[chosen] / n - share) <= 4 * np.sqrt(share * (1 - share) / n)).all()
    assert draw(np.array([0.0, 0.0, 1.0, 0.0], dtype=np.float32), rng.random()) == 2


@pytest.mark.parametrize("size", [5, DRAW_BLOCK, DRAW_BLOCK + 1, 3 * DRAW_BLOCK + 7])
def test_draw_takes_the_first_token_past_u_times_the_total(size):
    """Short arrays (one level) and long ones (two) pick the same token for the same uniform number: the first
    whose cumulative weight exceeds u * total, never one without weight, the last with weight when u * total
    rounds up to the total."""
    g = np.random.default_rng(size)
    w = (g.random(size) * (g.random(size) < 0.5)).astype(np.float32)
    w[[0, -1]] = 0.0  # zero weight at both ends
    w[size // 2] = 1.0
    cum = np.cumsum(w, dtype=np.float64)
    last = int(np.flatnonzero(w)[-1])
    for u in [0.0, 1e-12, *g.random(50), 1 - 2**-53]:
        token = draw(w, u)
        expected = min(int(np.searchsorted(cum, u * cum[-1], side="right")), last)
        assert token == expected and w[token] > 0, (u, token, expected)
    assert draw(w, np.nextafter(1.0, 0.0)) == last


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.99])
def test_min_p_mask_matches_hf(min_p):
    logits = random_logits(16, seed=int(min_p * 100))
    ours, theirs = apply_min_p(logits, min_p), MinPLogitsWarper(min_p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours, theirs)


def test_sampled_tokens_stay_inside_hf_masks():
    logits = random_logits(1, seed=9)[0]
    temperature, top_k, top_p, min_p = 0.7, 30, 0.8, 0.05
    x = (logits / temperature)[None]
    for warper in (TopKLogitsWarper(top_k), TopPLogitsWarper(top_p), MinPLogitsWarper(min_p)):
        x = warper(None, x)
    allowed = set(torch.nonzero(~torch.isinf(x[0])).flatten().tolist())
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=0)
    sampler = TokenSampler(params, [], V)
    drawn = {sampler(logits) for _ in range(300)}
    assert drawn <= allowed and len(drawn) > 1


def test_presence_and_frequency_penalties():
    prompt = [5, 6]  # the prompt does not count for OpenAI-style penalties
    sampler = TokenSampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, V)
    for t in (3, 3, 3, 7):
        sampler.accept(t)
    logits = random_logits(1)[0]
    expected = logits.clone()
    expected[3] -= 3 * 0.25 + 0.5
    expected[7] -= 1 * 0.25 + 0.5
    assert torch.equal(sampler.processed_logits(logits), expected)


def test_logit_bias_is_added_and_can_force_or_ban(draw_path):
    logits = random_logits(1)[0]
    sampler = TokenSampler(SamplingParams(logit_bias={2: 1.5, 9: -3.0}), [], V)
    expected = logits.clone()
    expected[2] += 1.5
    expected[9] -= 3.0
    assert torch.equal(sampler.processed_logits(logits), expected)
    assert set(run(SamplingParams(logit_bias={11: 100}, seed=0), random_logits(20))) == {11}
    top = int(logits.argmax())
    assert run(SamplingParams(temperature=0, logit_bias={top: -100}), [logits]) != [top]


# --- the draw in gptchat's kernel (kernels/sampling.cpp) against the NumPy steps ---


@pytest.fixture
def sample_ops():
    ops = kernels.ops()
    if ops is None:
        pytest.skip("gptchat's kernels are not available on this machine")
    return ops


def numpy_path(sampler, logits, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(sampling.kernels, "loaded", lambda: None)
        return sampler(logits)


def test_kernel_draws_the_numpy_paths_tokens(sample_ops, monkeypatch):
    """Same seed, same logits: the kernel and the NumPy steps draw the same tokens, over real and small
    vocabularies (tails past a multiple of 8, padding), flat and peaked rows, banned tokens, ties at the top,
    long tails top-p must reach into, and every mix of temperature, top-p and min-p."""
    monkeypatch.setattr(sampling.kernels, "loaded", lambda: sample_ops)
    g = np.random.default_rng(0)
    cases = 0
    for case in range(160):
        vocab = int(g.choice([49152, 49155, 1000, 64, 7]))
        x = torch.from_numpy((g.standard_normal(vocab + int(g.choice([0, 5, 64]))) * g.choice([0.3, 1, 3, 8, 30])))
        x = x.float()
        if case % 5 == 0 and vocab > 100:
            x[g.integers(0, vocab, 10)] = -math.inf
        if case % 7 == 0:
            x[g.integers(0, vocab, 3)] = x[:vocab].max()
        if case % 11 == 0 and vocab == 49152:  # a long tail: the 1e-4 (or 1e-8) candidates fall short of top-p
            x[:] = float(g.choice([-10.0, -19.5]))
            x[[5, 900, 40000]] = torch.tensor([0.0, -0.5, -1.0])
        params = SamplingParams(temperature=float(g.choice([0.1, 0.7, 1.0, 1.5])), top_p=float(g.choice([1.0, 0.9, 0.5, 0.999, 0.99995])),
                                min_p=float(g.choice([0.0, 0.0, 0.05, 0.3])), seed=case)
        kernel, reference = TokenSampler(params, [], vocab), TokenSampler(params, [], vocab)
        for _ in range(3):
            assert kernel(x) == numpy_path(reference, x, monkeypatch), (case, params)
            cases += 1
    assert cases == 480


def test_kernel_declines_what_the_numpy_path_decides(sample_ops, monkeypatch):
    """A NaN or +inf logit, no finite logit, or a temperature that rounds to 0 in float32: the kernel returns
    -1 and the sampler takes the NumPy path, whose token it then gives."""
    monkeypatch.setattr(sampling.kernels, "loaded", lambda: sample_ops)
    logits = random_logits(1, vocab=1000, seed=4)[0]
    assert 0 <= sample_ops.sample_token(logits, 1000, 0.7, 0.9, 0.0, 0.5) < 1000
    for value in (NAN, math.inf):
        bad = logits.clone()
        bad[17] = value
        assert sample_ops.sample_token(bad, 1000, 0.7, 0.9, 0.0, 0.5) == -1
        params = SamplingParams(temperature=0.7, seed=2)
        assert TokenSampler(params, [], 1000)(bad) == numpy_path(TokenSampler(params, [], 1000), bad, monkeypatch)
    assert sample_ops.sample_token(torch.full((1000,), -math.inf), 1000, 0.7, 0.9, 0.0, 0.5) == -1
    assert sample_ops.sample_token(logits, 1000, 1e-46, 1.0, 0.0, 0.5) == -1
    with pytest.raises(RuntimeError, match="contiguous 1-D float32"):
        sample_ops.sample_token(logits.double(), 1000, 0.7, 0.9, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="u in"):
        sample_ops.sample_token(logits, 1000, 0.7, 0.9, 0.0, 1.0)


@pytest.mark.parametrize("top_p,min_p", [(1.0, 0.0), (1.0, 0.2), (0.9, 0.0), (0.9, 0.2)])
def test_kernel_draw_at_the_ends_of_the_uniform_range(sample_ops, top_p, min_p):
    """u = 0 gives the first token with weight (the most likely, under top-p); u just below 1 the last token
    kept; never one that top-p, min-p or a -inf logit removed."""
    x = torch.full((49155,), -math.inf)
    x[[3, 100, 20000, 49154]] = torch.tensor([1.0, 3.0, 2.0, 0.5])  # probabilities .08 .61 .22 .05 at T 1
    ends = {(1.0, 0.0): (3, 49154), (1.0, 0.2): (100, 20000), (0.9, 0.0): (100, 3), (0.9, 0.2): (100, 20000)}
    first, last = ends[(top_p, min_p)]
    assert sample_ops.sample_token(x, 49155, 1.0, top_p, min_p, 0.0) == first
    assert sample_ops.sample_token(x, 49155, 1.0, top_p, min_p, 1 - 2**-53) == last
    drawn = {sample_ops.sample_token(x, 49155, 1.0, top_p, min_p, u) for u in np.linspace(0, 1, 200, endpoint=False)}
    assert drawn == {3, 100, 20000, 49154} - ({3, 49154} if min_p else set()) - ({49154} if top_p < 1 else set())
