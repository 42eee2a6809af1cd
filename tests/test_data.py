"""Training data: token shards, deterministic batches, dialogue loss masks, and errors that name file and line.

The tokenizer is trained here on a few kilobytes of text (byte-level BPE, the chat special tokens,
ChatML), in well under a second.
"""

import json

import numpy as np
import pytest

from gptchat.data import DialogueData, TextData, encode_dialogue, prepare_text, read_dialogues, read_texts, token_dtype
from gptchat.errors import GptchatError
from gptchat.templates import render_chat
from gptchat.tokenizer import Tokenizer
from gptchat.tokenizer_train import train_tokenizer

TEXT = "".join(f"Line {i}: the cat sat on the mat, and the dog ran in the park. " for i in range(300))
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Where is the cat?"},
    {"role": "assistant", "content": "On the mat."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "In the park, running."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(TEXT)
    tok, bpt = train_tokenizer([d / "corpus.txt"], 320)
    assert bpt > 1.5  # merges were learned: more than one byte per token on held-out text
    tok.save(d / "saved")
    return Tokenizer.from_file(d / "saved")


def test_trained_tokenizer_round_trips_with_chat_tokens(tok):
    assert 300 < tok.vocab_size <= 320  # merges stop early when no pair repeats
    assert tok.chat_template and tok.eos_token == "<|endoftext|>"
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == tok.backend.token_to_id("<|im_start|>")
    assert tok.backend.token_to_id("<|im_end|>") in tok.eos_ids
    assert tok.decode(tok.encode("héllo wörld ✓")) == "héllo wörld ✓"  # byte-level: nothing is unknown


def test_sft_mask_covers_exactly_the_assistant_tokens(tok):
    ids, mask = encode_dialogue(tok, CONVERSATION)
    text = render_chat(tok.chat_template, CONVERSATION, add_generation_prompt=False)
    assert ids == tok.encode(text)  # the pieces tokenise as the whole conversation does
    # the character spans the loss should cover: each reply's content and its <|im_end|>
    spans, pos = [], 0
    for m in CONVERSATION:
        if m["role"] == "assistant":
            start = text.index("<|im_start|>assistant\n" + m["content"], pos) + len("<|im_start|>assistant\n")
            spans.append((start, start + len(m["content"]) + len("<|im_end|>")))
            pos = spans[-1][1]
    offset, covered = 0, []
    for i, m in zip(ids, mask):
        piece = tok.decode([i], skip_special_tokens=False)
        inside = any(a <= offset and offset + len(piece) <= b for a, b in spans)
        assert m == int(inside), f"token {piece!r} at {offset}: mask {m}"
        if m:
            covered.append(piece)
        offset += len(piece)
    assert offset == len(text)
    assert "".join(covered) == "On the mat.<|im_end|>In the park, running.<|im_end|>"


def test_sharegpt_and_openai_formats_agree(tmp_path, tok):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in CONVERSATION]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": CONVERSATION}) + "\n\n" + json.dumps({"conversations": sharegpt}) + "\n")
    a, b = read_dialogues(f)
    assert a == b == CONVERSATION


def test_long_conversations_are_truncated_by_whole_turns(tok):
    full_ids, full_mask = encode_dialogue(tok, CONVERSATION)
    first_reply = encode_dialogue(tok, CONVERSATION[:3])
    ids, mask = encode_dialogue(tok, CONVERSATION, max_len=len(full_ids) - 1)
    assert (ids, mask) == first_reply  # the second exchange is dropped whole
    assert ids == full_ids[: len(ids)] and tok.decode(ids, skip_special_tokens=False).endswith("<|im_end|>\n")
    assert encode_dialogue(tok, CONVERSATION, max_len=5) is None  # not even the first reply fits


def test_dialogue_batches_are_padded_and_masked(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"messages": CONVERSATION[: 3 + 2 * (i % 2)]}) + "\n" for i in range(10)))
    data = DialogueData([f], tok, batch_size=4, max_len=128, seed=1, val_fraction=0.2)
    assert len(data.train) == 8 and len(data.val) == 2
    x, y, m = data.batch(3)
    x2, y2, m2 = data.batch(3)
    assert x.equal(x2) and y.equal(y2) and m.equal(m2)
    assert x.shape == y.shape == m.shape and m.any()
    real = x[:, 1:] != data.pad_id  # inside each row, the targets are the inputs shifted by one
    assert (x[:, 1:] == y[:, :-1])[real].all() and not m[y == data.pad_id].any()


def test_text_shards_and_deterministic_batches(tmp_path, tok):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(TEXT[:4000])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": TEXT[4000:8000]}) + "\n")
    meta = prepare_text([tmp_path / "docs", tmp_path / "b.jsonl"], tok, tmp_path / "shards", val_fraction=0.1)
    assert meta["dtype"] == "uint16" and meta["val_tokens"] > 0 and meta["bytes_per_token"] > 1
    train = np.memmap(tmp_path / "shards" / "train.bin", dtype=np.uint16, mode="r")
    assert len(train) == meta["train_tokens"]
    assert prepare_text([tmp_path / "docs", tmp_path / "b.jsonl"], tok, tmp_path / "shards") == meta  # reused
    data = TextData(tmp_path / "shards", batch_size=4, seq_len=16, seed=7)
    x, y, _ = data.batch(5, 1)
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert x.equal(TextData(tmp_path / "shards", 4, 16, seed=7).batch(5, 1)[0])  # (seed, step) decide
    assert not x.equal(data.batch(6, 1)[0])
    assert sum(v[0].numel() for v in data.val_batches()) > 0
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


@pytest.mark.parametrize(
    "content, where, words",
    [
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n', ":2:", "invalid JSON"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', ":1:", "unknown role"),
        ('\n{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}\n', ":2:", "unknown role"),
        ("  \n", "", "empty file"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1:", "no assistant"),
        ('{"text": "hi"}\n', ":1:", "expected"),
    ],
)
def test_bad_dialogues_name_file_and_line(tmp_path, content, where, words):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(GptchatError, match=words) as e:
        read_dialogues(f)
    assert f"{f}{where}" in str(e.value)


def test_bad_text_names_file_and_line(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptchatError, match="empty file") as e:
        list(read_texts([tmp_path / "empty.txt"]))
    assert str(tmp_path / "empty.txt") in str(e.value)
    (tmp_path / "t.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(GptchatError, match="no text field") as e:
        list(read_texts([tmp_path / "t.jsonl"]))
    assert f"{tmp_path / 't.jsonl'}:2:" in str(e.value)
    (tmp_path / "j.jsonl").write_text('{"text": "fine"}\n\n[1,\n')
    with pytest.raises(GptchatError, match=r"j\.jsonl:3: invalid JSON"):
        list(read_texts([tmp_path / "j.jsonl"]))
    with pytest.raises(GptchatError, match="no such file"):
        list(read_texts([tmp_path / "missing.txt"]))
