"""Streaming: deltas never split a UTF-8 character, join to the full decode, and stop exactly at stops."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptchat.streaming import IncrementalDetokenizer, StopStringMatcher

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world, hello there! Streaming text is fun.",
    "你好，世界。今天天气很好。我们去公园散步吧。",
    "Emoji time 😀🎉🚀 and more 👍🏽 family 👨‍👩‍👧",
] * 5

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog, twice.",
    "chinese": "你好世界！今天天气很好，我们去公园散步吧。龍鳳",
    "emoji": "Emoji 😀🎉🚀 family 👨‍👩‍👧 thumbs 👍🏽 done",
    "mixed": "Hello 你好世界! 今天 😀🎉 ok 👨‍👩‍👧 done, 龍 ñ é",
}


@pytest.fixture(scope="module")
def tok():
    """A real byte-level BPE, small enough that rare characters stay split into byte tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def stream(detok, ids):
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("name", TEXTS)
def test_deltas_join_to_full_decode_and_never_split_a_character(tok, name):
    ids = tok.encode(TEXTS[name]).ids
    if name != "english":  # prove the test exercises tokens that end mid-character
        assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    deltas = stream(IncrementalDetokenizer(tok.decode), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == TEXTS[name]


def test_split_character_is_held_until_completed(tok):
    ids = tok.encode("龍").ids
    assert len(ids) == 3  # three byte tokens for one 3-byte character
    detok = IncrementalDetokenizer(tok.decode)
    assert [detok.push(i) for i in ids] == ["", "", "龍"]
    assert detok.flush() == ""


def test_flush_releases_an_incomplete_character(tok):
    ids = tok.encode("ok 龍").ids
    detok = IncrementalDetokenizer(tok.decode)
    sent = "".join(detok.push(i) for i in ids[:-1])
    assert sent == "ok "
    assert detok.text == tok.decode(ids[:-1])  # held text counts
    assert detok.flush().endswith("\ufffd")


def test_with_prompt_only_new_text_is_streamed(tok):
    prompt = tok.encode("Hello 你好! ").ids
    new = tok.encode("今天 😀 fine").ids
    deltas = stream(IncrementalDetokenizer(tok.decode, prompt_ids=prompt), new)
    assert "".join(deltas) == tok.decode(prompt + new)[len(tok.decode(prompt)) :] == tok.decode(new)


def test_decode_window_stays_small(tok):
    """The decoded window does not grow with the sequence: cost per token is O(small)."""
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    ids = tok.encode(" ".join([TEXTS["mixed"]] * 20)).ids
    deltas = stream(IncrementalDetokenizer(decode, prompt_ids=ids[:50]), ids[50:])
    assert "".join(deltas) == tok.decode(ids)[len(tok.decode(ids[:50])) :]
    assert max(calls) <= 10


def test_random_byte_tokens_join_to_full_decode(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(40)]
        deltas = stream(IncrementalDetokenizer(tok.decode), ids)
        assert "".join(deltas) == tok.decode(ids)  # invalid byte runs included


def test_sentencepiece_style_leading_space_is_kept():
    """A decoder that strips the leading space of its first token still streams with correct spacing."""
    vocab = ["▁Hello", "▁world", ",", "▁how", "▁are", "▁you", "?"]

    def decode(ids):
        text = "".join(vocab[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text

    prompt, new = [0], [1, 2, 3, 4, 5, 6]
    deltas = stream(IncrementalDetokenizer(decode, prompt_ids=prompt), new)
    assert "".join(deltas) == " world, how are you?"
    assert deltas[0] == " world"  # decoding "▁world" alone would have lost its space
    # without a prompt the first token's space is dropped, exactly as decode(all ids) drops it
    assert "".join(stream(IncrementalDetokenizer(decode), new)) == decode(new)


# --- stop strings ---


def run_matcher(stops, deltas):
    matcher = StopStringMatcher(stops)
    out = []
    for d in deltas:
        text, stopped = matcher.push(d)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), matcher.stopped


def expected(full, stops):
    starts = [i for i in (full.find(s) for s in stops) if i >= 0]
    return (full[: min(starts)], True) if starts else (full, False)


def chunkings(text, rng):
    yield list(text)  # one character per delta
    yield [text]
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 8))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


CASES = [
    ("Hello world\nUser: hi", ["\nUser:"]),
    ("Hello world\nUser: hi", ["User:", "\nUser:"]),  # both match; the one starting first wins
    ("abcabcd", ["abcd", "bc"]),  # "bc" starts first: cut there
    ("xabcd", ["abcd", "bc"]),  # "abcd" starts before "bc": cut at "abcd"
    ("no stop here", ["STOP", "\n\n"]),
    ("almost STO", ["STOP"]),  # a partial stop at the end is released by flush
    ("你好世界。结束", ["。结", "界"]),
    ("aaab", ["aab"]),
    ("😀😀🎉 end", ["🎉"]),
    ("stop at start", ["stop"]),
]


@pytest.mark.parametrize("full,stops", CASES)
def test_stop_matcher_cuts_at_earliest_stop(full, stops):
    rng = random.Random(full)
    for deltas in chunkings(full, rng):
        assert run_matcher(stops, deltas) == expected(full, stops), deltas


def test_stop_matcher_random_texts():
    rng = random.Random(1)
    for _ in range(300):
        full = "".join(rng.choice("ab\n") for _ in range(rng.randrange(1, 20)))
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 4))]
        for deltas in chunkings(full, rng) if len(full) > 1 else [[full]]:
            assert run_matcher(stops, deltas) == expected(full, stops), (full, stops, deltas)


def test_stop_matcher_holds_only_possible_stop_prefixes():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.push("Hi <") == ("Hi ", False)
    assert matcher.push("b>") == ("<b>", False)
    assert matcher.push(" </") == (" ", False)
    assert matcher.push("s> tail") == ("", True)


def test_stop_matcher_without_stops_passes_through():
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_detokenizer_and_matcher_together(tok):
    full = TEXTS["mixed"]
    ids = tok.encode(full).ids
    detok, matcher = IncrementalDetokenizer(tok.decode), StopStringMatcher(["😀🎉"])
    out = []
    for i in ids:
        text, stopped = matcher.push(detok.push(i))
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == full[: full.find("😀🎉")]
