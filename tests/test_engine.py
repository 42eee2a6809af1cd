"""Generation on the real default model and on tiny ones: greedy answers, streaming, stops, seeds, limits."""

import os
import subprocess
import sys

import pytest
import torch

import gptchat
from gptchat import ChatSession, Conversation, Engine, SamplingParams, build_prompt

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(default_lm):
    return Engine(default_lm)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return Engine(gptchat.load_model(tiny_llama_dir[0]))


def prompt_ids(engine, messages=QUESTION):
    return build_prompt(engine, messages, 64).ids


# -- the real default model -----------------------------------------------------------------------


GROWTH_SCRIPT = """
import os, torch, gptchat
torch.set_num_threads(2)
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
lm = gptchat.load_model(quant="int4")
ids = gptchat.Engine(lm).encode(" ".join(f"item {i}," for i in range(300)))
sizes = []
for n in range(200, 248, 2):
    gptchat.Engine(lm).generate(ids[:n], gptchat.SamplingParams(max_new_tokens=1, temperature=0))
    sizes.append(rss())
print(sizes[5], sizes[-1], os.environ["LRU_CACHE_CAPACITY"], os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_prompts_of_new_lengths_leave_memory_where_it_was():
    """Each bfloat16 prompt of a new length builds oneDNN primitives for its matmul shapes. Their caches are
    capped (engine.bound_onednn_caches): 18 more prompts of new lengths grew this process by ~60 MiB before,
    ~5 now. In a fresh process, as the caches read their capacity once; a capacity the user set wins."""
    from gptchat.engine import prefill_dtype

    if prefill_dtype() != torch.bfloat16:
        pytest.skip("prompts run in float32 on this CPU (no oneDNN bfloat16 primitives)")
    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    done = subprocess.run([sys.executable, "-c", GROWTH_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    early, late, lru, onednn = done.stdout.split()
    assert (lru, onednn) == ("16", "16")
    assert float(late) - float(early) < 25
    done = subprocess.run([sys.executable, "-c", GROWTH_SCRIPT.replace("range(200, 248, 2)", "range(200, 212, 2)")],
                          capture_output=True, text=True, timeout=600, env={**env, "LRU_CACHE_CAPACITY": "99"})
    assert done.returncode == 0 and done.stdout.split()[2:] == ["99", "16"], done.stderr[-2000:]


@pytest.mark.slow
def test_default_model_answers_paris(engine):
    ids = prompt_ids(engine)
    # the model's own template inserts its default system prompt
    assert engine.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nYou are a helpful")
    result = engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=32))
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop" and result.prompt_tokens == len(ids)
    assert result.completion_tokens == len(result.token_ids) + 1  # the end-of-turn token counts


@pytest.mark.slow
def test_int8_default_model_answers_paris():
    engine = Engine(gptchat.load_model(quant="int8"))
    assert "Paris" in engine.generate(prompt_ids(engine), SamplingParams(temperature=0, max_new_tokens=32)).text


@pytest.mark.slow
@pytest.mark.parametrize("question", ["What is the capital of France?", "请用中文介绍一下你自己。", "Reply with three emoji."])
def test_streamed_text_equals_generated_text(engine, question):
    ids = prompt_ids(engine, [{"role": "user", "content": question}])
    params = SamplingParams(temperature=0, max_new_tokens=40)
    deltas = list(engine.stream(ids, params))
    # only a reply cut by the length limit may end in half a character (decode() shows that as U+FFFD)
    assert all("\ufffd" not in d.text for d in deltas[:-1])
    assert "\ufffd" not in deltas[-1].text or deltas[-1].finish_reason == "length"
    result = engine.generate(ids, params)
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert result.text == engine.decode(result.token_ids)


@pytest.mark.slow
def test_chinese_reply_streams_cleanly(engine):
    ids = prompt_ids(engine, [{"role": "user", "content": "Translate to Chinese: I love my family."}])
    deltas = list(engine.stream(ids, SamplingParams(temperature=0, max_new_tokens=30)))
    text = "".join(d.text for d in deltas)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text), text
    assert all("\ufffd" not in d.text for d in deltas)


@pytest.mark.slow
def test_multi_turn_feeds_history_back(engine):
    session = ChatSession(engine, params=SamplingParams(temperature=0, max_new_tokens=40))
    first = "".join(d.text for d in session.send("What is the capital of France?"))
    second = "".join(d.text for d in session.send("And what is the capital of Germany?"))
    assert "Paris" in first and "Berlin" in second
    roles = [m["role"] for m in session.conversation.messages]
    assert roles == ["user", "assistant", "user", "assistant"]


# -- sampling semantics on a tiny model (fast) --------------------------------------------------


PROMPT = [5, 6, 7, 8, 9, 10]


def test_greedy_is_deterministic_and_top_k_1_equals_greedy(tiny):
    greedy = tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=20))
    assert tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=20)).token_ids == greedy.token_ids
    top1 = tiny.generate(PROMPT, SamplingParams(temperature=1.3, top_k=1, seed=5, max_new_tokens=20))
    assert top1.token_ids == greedy.token_ids


def test_seed_makes_sampling_reproducible(tiny):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=30)
    a, b = tiny.generate(PROMPT, params), tiny.generate(PROMPT, params)
    assert a.token_ids == b.token_ids
    others = {tuple(tiny.generate(PROMPT, SamplingParams(temperature=1.0, seed=s, max_new_tokens=30)).token_ids)
              for s in range(4)}
    assert len(others) > 1


def test_no_repeat_ngram(tiny):
    n = 3
    result = tiny.generate(PROMPT, SamplingParams(temperature=0, no_repeat_ngram_size=n, max_new_tokens=60,
                                                  stop_token_ids=()))
    seq = PROMPT + result.token_ids
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    assert len(grams) == len(set(grams))


def test_max_new_tokens_and_max_length(tiny):
    eos = {i: -100.0 for i in tiny.tokenizer.eos_ids}  # never end early
    r = tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=7, logit_bias=eos))
    assert len(r.token_ids) == 7 and r.finish_reason == "length"
    r = tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=None, max_length=16, logit_bias=eos))
    assert len(PROMPT) + len(r.token_ids) == 16 and r.finish_reason == "length"
    with pytest.raises(gptchat.InvalidParameterError, match="max_length"):
        tiny.generate(PROMPT, SamplingParams(max_length=3))


def test_generation_stops_at_the_context_end(tiny):
    eos = {i: -100.0 for i in tiny.tokenizer.eos_ids}
    prompt = list(range(3, 3 + tiny.context_length - 5))
    r = tiny.generate(prompt, SamplingParams(temperature=0, max_new_tokens=None, logit_bias=eos))
    assert len(r.token_ids) == 5 and r.finish_reason == "length"
    with pytest.raises(gptchat.ContextLengthError, match="context"):
        tiny.generate(list(range(3, 3 + tiny.context_length)), SamplingParams())


def test_stop_strings_cut_exactly(tiny):
    eos = {i: -100.0 for i in tiny.tokenizer.eos_ids}
    full = tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=40, logit_bias=eos)).text
    assert len(full) > 12
    stop = full[8:11]
    cut = tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=40, logit_bias=eos, stop=[stop]))
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(d.text for d in tiny.stream(PROMPT, SamplingParams(temperature=0, max_new_tokens=40,
                                                                          logit_bias=eos, stop=[stop])))
    assert streamed == cut.text


def test_stop_token_ids(tiny):
    eos = {i: -100.0 for i in tiny.tokenizer.eos_ids}
    full = tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=20, logit_bias=eos))
    stop_at = full.token_ids[4]
    first = full.token_ids.index(stop_at)
    r = tiny.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=20, logit_bias=eos, stop_token_ids=[stop_at]))
    assert r.token_ids == full.token_ids[:first] and r.finish_reason == "stop"


def test_bad_parameters_are_rejected_before_generating(tiny):
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(gptchat.InvalidParameterError):
            tiny.stream(PROMPT, SamplingParams(**bad))


# -- conversations and the context budget ---------------------------------------------------------


def test_oldest_turns_are_dropped_system_prompt_stays(tiny):
    conv = Conversation.with_system("Be brief.")
    for i in range(12):
        conv.add("user", f"question number {i} about Paris and Berlin")
        conv.add("assistant", f"answer number {i}")
    conv.add("user", "last question")
    prompt = build_prompt(tiny, conv.messages, 16)
    assert prompt.dropped > 0 and prompt.dropped % 2 == 0  # whole turns
    text = tiny.tokenizer.decode(prompt.ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.") and "last question" in text
    assert "question number 0 " not in text
    assert len(prompt.ids) + 16 <= tiny.context_length


def test_a_message_that_cannot_fit_is_an_error(tiny):
    conv = Conversation.with_system("Be brief.")
    conv.add("user", "Paris " * 400)
    with pytest.raises(gptchat.ContextLengthError, match="cannot fit"):
        build_prompt(tiny, conv.messages, 16)
    session = ChatSession(tiny, Conversation.with_system("Be brief."))
    with pytest.raises(gptchat.ContextLengthError):
        session.send("Paris " * 400)
    assert [m["role"] for m in session.conversation.messages] == ["system"]  # nothing half-recorded


def test_session_tells_about_dropped_turns_and_keeps_interrupted_replies(tiny):
    session = ChatSession(tiny, params=SamplingParams(temperature=0, max_new_tokens=20))
    for i in range(8):
        "".join(d.text for d in session.send(f"tell me about Paris and Berlin, part {i}"))
    assert session.last_dropped > 0
    stream = session.send("one more")
    first = next(stream)
    stream.close()  # the user pressed Ctrl-C
    assert session.conversation.messages[-1] == {"role": "assistant", "content": first.text}


def test_conversation_save_load(tmp_path):
    conv = Conversation.with_system("You are a pirate.")
    conv.add("user", "你好")
    conv.add("assistant", "Ahoy!")
    conv.save(tmp_path / "c.json")
    again = Conversation.load(tmp_path / "c.json")
    assert again.messages == conv.messages and again.system == "You are a pirate."
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    with pytest.raises(gptchat.GptchatError, match="message 0"):
        Conversation.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(gptchat.GptchatError, match="not valid JSON"):
        Conversation.load(tmp_path / "broken.json")
    with pytest.raises(gptchat.GptchatError, match="cannot read"):
        Conversation.load(tmp_path / "missing.json")


def test_reset_and_system():
    conv = Conversation.with_system("A")
    conv.add("user", "hi")
    conv.set_system("B")
    assert conv.messages == [{"role": "system", "content": "B"}, {"role": "user", "content": "hi"}]
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "B"}]
    conv.set_system(None)
    assert conv.messages == []
