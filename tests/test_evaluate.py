"""`gptchat eval`: each measure checked against the model computed directly, and the CLI end to end on a
checkpoint trained here (report.md + a real PNG). Tiny 2-layer models; ~10 s without the slow test.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import gptchat
from gptchat import evaluate as ev
from gptchat.cli import main
from gptchat.data import TextData, prepare_text
from gptchat.model import GPT
from gptchat.tokenizer import Tokenizer
from gptchat.tokenizer_train import train_tokenizer
from gptchat.train import TrainSettings, model_config, train

TEXT = "The capital of France is Paris. Hello there! How are you today? I am fine, thank you. " * 3
MMLU_ROWS = [
    {"question": "What is the capital of France?", "answer_a": "Paris", "answer_b": "Berlin", "answer_c": "a cat",
     "answer_d": "twelve", "correct_answer": "A", "topic": "geography"},
    {"question": "How are you?", "answer_a": "fine, thank you", "answer_b": "Paris", "answer_c": "no",
     "answer_d": "3.14159", "correct_answer": "D", "topic": "manners"},
    {"question": "def add(a, b):", "choices": ["return a + b", "你好", "emoji"], "answer": 0, "subject": "code"},
]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    lm = gptchat.load_model(tiny_llama_dir[0], quant="none")
    lm.model.eval()
    return lm


def direct_nll(lm, ids):
    """Per-token NLL of ids[1:] from one forward pass over the whole sequence."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))[0]
    return F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="none")


def test_perplexity_and_bits_per_byte_are_the_mean_nll(lm, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(TEXT)
    nll = direct_nll(lm, ids)
    got = ev.text_metrics(lm, [f])  # the text fits one window: the same computation
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == len(TEXT.encode())
    assert got["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll.sum().item() / math.log(2) / len(TEXT.encode()), rel=1e-5)
    # windows of 8 tokens scoring 8 new ones each: independent chunks, each computed directly (the
    # last, shorter one still reads a full window of context)
    n = len(ids)
    chunks = torch.cat([direct_nll(lm, ids[max(0, min(s + 8, n - 1) - 8) : min(s + 8, n - 1) + 1])[-(min(s + 8, n - 1) - s):]
                        for s in range(0, n - 1, 8)])
    assert ev.text_metrics(lm, [f], window=8, stride=8)["loss"] == pytest.approx(chunks.mean().item(), rel=1e-5)
    # overlapping windows: every token is scored once, with more context than in chunks
    sliding = ev.text_metrics(lm, [f], window=16, stride=4)
    assert sliding["tokens"] == len(ids) - 1


def test_mmlu_choice_is_the_argmax_of_option_log_likelihood(lm, tmp_path):
    f = tmp_path / "mmlu.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MMLU_ROWS))
    result = ev.mmlu(lm, f)
    questions = ev.read_mmlu(f)
    correct = correct_norm = 0
    for q, row in zip(questions, result["rows"]):
        context = lm.tokenizer.encode(ev.mmlu_prompt(q, []), add_special_tokens=True)
        scores, per_byte = [], []
        for option in q.options:  # one sequence at a time, no batching, no padding
            cont = lm.tokenizer.encode(" " + option)
            scores.append(-direct_nll(lm, context + cont)[-len(cont):].sum().item())
            per_byte.append(scores[-1] / len((" " + option).encode()))
        best, best_norm = max(range(len(scores)), key=scores.__getitem__), max(range(len(scores)), key=per_byte.__getitem__)
        assert row["chosen"] == "ABCD"[best] and row["chosen_norm"] == "ABCD"[best_norm]
        correct, correct_norm = correct + (best == q.answer), correct_norm + (best_norm == q.answer)
    assert result["acc"] == correct / 3 and result["acc_norm"] == correct_norm / 3
    assert set(result["subjects"]) == {"geography", "manners", "code"}
    assert result["chance"] == pytest.approx((0.25 + 0.25 + 1 / 3) / 3)
    # few-shot: the other questions of the subject are the examples
    q = questions[0]
    assert ev.mmlu_prompt(q, [questions[1]]).count("Question:") == 2


@pytest.mark.parametrize("text, number", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("So the answer is 1,250.50 dollars.", "1250.5"),
    ("Total: 3 + 4 = 7. The answer is 7.", "7"),
    ("#### -3.00", "-3"),
    ("12 apples ####", "12"),  # nothing after ####: the last number
    ("no number here", None),
])
def test_gsm8k_final_number(text, number):
    assert ev.final_number(text) == number


def test_limit_spreads_rows_over_the_file():
    assert ev.evenly(list(range(10)), 3) == [0, 3, 6] and ev.evenly([1, 2], 5) == [1, 2]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-layer model trained for 20 steps here: its run folder (model/ and metrics.jsonl)."""
    d = tmp_path_factory.mktemp("run")
    (d / "corpus.txt").write_text(TEXT * 10)
    tok, _ = train_tokenizer([d / "corpus.txt"], 320)
    tok.save(d / "tok")
    tok = Tokenizer.from_file(d / "tok")
    prepare_text([d / "corpus.txt"], tok, d / "shards", val_fraction=0.1)
    torch.manual_seed(0)
    model = GPT(model_config(tok.vocab_size, 256, depth=2, width=64, heads=2))
    s = TrainSettings(out=str(d / "run"), steps=20, lr=3e-3, eval_every=10, log_every=1000)
    train(model, tok, TextData(d / "shards", 4, 256), s, log=lambda line: None)
    return d / "run", d / "corpus.txt"


def test_cli_eval_writes_report_with_loss_curve(trained_run, tmp_path, capsys):
    run, corpus = trained_run
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MMLU_ROWS))
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    report = tmp_path / "report"
    assert main(["eval", "--model", str(run / "model"), "--text", str(corpus), "--mmlu", str(tmp_path / "mmlu.jsonl"),
                 "--limit", "2", "--gsm8k", str(tmp_path / "gsm8k.jsonl"), "--max-new-tokens", "8", "--chats",
                 "--run", str(run), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "on 2 questions" in out and "on 1 problems" in out and "sample chats: 6" in out
    md = (report / "report.md").read_text()
    for heading in ("## Training run", "## Text", "## MMLU", "## GSM8K", "## Sample chats", "![loss curve](loss.png)"):
        assert heading in md
    png = (report / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    assert plt.imread(report / "loss.png").shape[:2] == (400, 700)
    results = json.loads((report / "results.json").read_text())
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert results["run"]["val_loss"] == final["val_loss"] and results["run"]["steps"] == 20


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("  \n", "empty file"),
    (json.dumps(MMLU_ROWS[0]) + "\n{broken\n", ":2: invalid JSON"),
    ('{"question": "q", "answer_a": "a", "answer_b": "b", "correct_answer": "E"}\n', ":1: expected question"),
])
def test_bad_mmlu_files_are_one_line_errors(tiny_llama_dir, tmp_path, capsys, content, message):
    f = tmp_path / "m.jsonl"
    if content is not None:
        f.write_text(content)
    assert main(["eval", "--model", str(tiny_llama_dir[0]), "--mmlu", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gptchat: error: {f}") and message in err[0]


def test_run_needs_a_report_and_something_to_do(capsys):
    assert main(["eval", "--run", "x"]) == 1 and main(["eval"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "--report" in err[0] and "nothing to evaluate" in err[1]


@pytest.mark.slow
def test_default_model_on_a_few_mmlu_rows(default_lm, tmp_path):
    """SmolLM2 on 4 easy hand-written questions (~3 s): a real model prefers the right answer."""
    rows = [("What is the capital of France?", ["Paris", "Tokyo", "Nairobi", "Lima"]),
            ("How many legs does a spider have?", ["eight", "three", "one hundred", "zero"]),
            ("What colour is the sky on a clear day?", ["blue", "green", "purple", "black"]),
            ("Which animal says 'moo'?", ["a cow", "a snake", "a fish", "a spider"])]
    f = tmp_path / "mmlu.jsonl"
    f.write_text("".join(json.dumps({"question": q, "choices": o, "answer": 0, "subject": "general"}) + "\n" for q, o in rows))
    assert ev.mmlu(default_lm, f)["acc"] >= 0.75
