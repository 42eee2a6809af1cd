"""The training loop: a tiny model overfits, resume is bit-exact, checkpoints load and chat, and the CLI
runs tokenizer train -> pretrain -> sft -> generate end to end.

Models here are 2 layers of width 64 on a tokenizer trained in the test; every run is seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptchat
from gptchat.checkpoints.native import save_native
from gptchat.data import DialogueData, TextData, prepare_text
from gptchat.errors import ModelLoadError
from gptchat.model import GPT
from gptchat.tokenizer import Tokenizer
from gptchat.tokenizer_train import train_tokenizer
from gptchat.train import TrainSettings, checkpoints, cpu_has_fast_bf16, lr_at, model_config, resolve_dtype, train

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"The cat number {i % 7} sat on the mat, and the dog ran in the park. " for i in range(120))
CHATS = [
    {"messages": [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "On the mat."}]},
    {"conversations": [{"from": "human", "value": "Where is the dog?"}, {"from": "gpt", "value": "In the park."}]},
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(directory, tokenizer, prepared shard directory)."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "corpus.txt").write_text(TEXT)
    tok, _ = train_tokenizer([d / "corpus.txt"], 320)
    tok.save(d / "tok")
    tok = Tokenizer.from_file(d / "tok")
    prepare_text([d / "corpus.txt"], tok, d / "shards", val_fraction=0.05)
    return d, tok, d / "shards"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def tiny_model(tok, seq_len=32, seed=0):
    torch.manual_seed(seed)
    return GPT(model_config(tok.vocab_size, seq_len, depth=2, width=64, heads=2))


def quiet(_line):
    pass


def test_two_layer_model_overfits_a_short_text(corpus, tmp_path):
    _, tok, shards = corpus
    data = TextData(shards, batch_size=8, seq_len=32, seed=0)
    s = TrainSettings(out=str(tmp_path / "run"), steps=150, lr=3e-3, warmup=10, weight_decay=0.0, log_every=1000)
    last = train(tiny_model(tok), tok, data, s, log=quiet)
    # from ln(320) = 5.8 nats at the start; the text repeats, so a model that learns it goes far below 1
    assert last["loss"] < 0.8, last
    assert last["val_loss"] < 1.0 and last["val_bpb"] > 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["val_loss"] > 5  # before training
    assert [r["step"] for r in lines[1:]] == list(range(1, 151))


def test_schedule_warms_up_then_decays():
    s = TrainSettings(out="x", steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0) and lr_at(100, s) == pytest.approx(0.1)
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(10, 100))
    linear = TrainSettings(out="x", steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1, schedule="linear")
    assert lr_at(9, linear) == pytest.approx(1.0) and lr_at(100, linear) == pytest.approx(0.1)
    assert lr_at(55, linear) == pytest.approx(0.55)  # halfway down, in a straight line
    assert lr_at(55, s) == pytest.approx(0.55)  # cosine passes the same midpoint...
    assert lr_at(30, linear) < lr_at(30, s)  # ...but stays higher before it


def test_dtype_auto_is_bf16_only_where_it_is_fast():
    assert resolve_dtype("auto", "cpu") == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_dtype("bf16", "cpu") == "bf16" and resolve_dtype("fp32", "cpu") == "fp32"


def test_bf16_samples_and_progress_bar(corpus, tmp_path, capsys):
    """bf16 autocast trains (the loss falls); each checkpoint appends greedy samples; the bar shows tok/s."""
    _, tok, shards = corpus
    data = TextData(shards, batch_size=8, seq_len=32, seed=0)
    s = TrainSettings(out=str(tmp_path / "r"), steps=20, lr=3e-3, save_every=10, dtype="bf16",
                      sample_prompts=("The cat", "the dog"), sample_tokens=6)
    last = train(tiny_model(tok), tok, data, s, progress=True)
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert last["val_loss"] < first["val_loss"] - 1.0
    samples = [json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in samples] == [(10, "The cat"), (10, "the dog"), (20, "The cat"), (20, "the dog")]
    assert all(isinstance(r["sample"], str) and r["sample"] for r in samples)
    err = capsys.readouterr().err
    assert "20/20" in err and "tok_s=" in err and "sample @20: 'The cat' -> " in err


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(corpus, tmp_path, monkeypatch):
    """The process dies while writing step 8 (here: the optimizer file fails half-written): step 4 stays
    the newest complete checkpoint, it loads, and --resume continues from it."""
    _, tok, shards = corpus
    data = TextData(shards, batch_size=4, seq_len=32, seed=0)
    s = TrainSettings(out=str(tmp_path / "r"), steps=12, lr=2e-3, save_every=4, keep=3)
    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt  # as a Ctrl-C or a kill in the middle of the write
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(tok), tok, data, s, log=quiet)
    monkeypatch.setattr(torch, "save", real_save)
    out = tmp_path / "r"
    assert [p.name for p in checkpoints(out)] == ["step-000004"]
    assert not (out / "step-000008").exists() and (out / ".tmp-step-000008").is_dir()  # the torn write
    lm = gptchat.load_model(out / "step-000004")
    assert json.loads((out / "step-000004" / "gptchat.json").read_text())["info"]["step"] == 4
    assert lm.config.n_layer == 2
    train(tiny_model(tok, seed=9), tok, data, s, log=quiet, resume=True)
    assert [p.name for p in checkpoints(out)] == ["step-000004", "step-000008", "step-000012"]
    assert not list(out.glob(".tmp-*"))


def test_resume_is_bit_identical(corpus, tmp_path):
    _, tok, shards = corpus
    data = TextData(shards, batch_size=4, seq_len=32, seed=3)

    def settings(name):
        return TrainSettings(out=str(tmp_path / name), steps=12, lr=2e-3, warmup=3, grad_accum=2, save_every=4,
                             keep=2, seed=3, log_every=1000)

    train(tiny_model(tok, seed=5), tok, data, settings("straight"), log=quiet)
    # interrupted after step 6: the newest checkpoint is step 4, steps 5-6 are lost and redone
    train(tiny_model(tok, seed=5), tok, data, settings("resumed"), log=quiet, stop_after=6)
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["step-000004"]
    assert not (tmp_path / "resumed" / "model").exists()
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    train(tiny_model(tok, seed=99), tok, data, settings("resumed"), log=quiet, resume=True)

    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(13))  # the redone steps 5-6 are logged once
    a = gptchat.load_model(tmp_path / "straight" / "model").model.state_dict()
    b = gptchat.load_model(tmp_path / "resumed" / "model").model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = torch.load(tmp_path / "straight" / "step-000012" / "optimizer.pt")
    opt_b = torch.load(tmp_path / "resumed" / "step-000012" / "optimizer.pt")
    for i, st in opt_a["state"].items():
        assert torch.equal(st["exp_avg"], opt_b["state"][i]["exp_avg"])
    # the last K (= 2) checkpoints are kept, and no temporary directory is left behind
    assert [p.name for p in checkpoints(tmp_path / "straight")] == ["step-000008", "step-000012"]
    assert not list((tmp_path / "straight").glob(".*"))


def test_checkpoint_loads_and_generates(corpus, tmp_path):
    _, tok, shards = corpus
    data = TextData(shards, batch_size=8, seq_len=32, seed=0)
    train(tiny_model(tok), tok, data, TrainSettings(out=str(tmp_path / "r"), steps=20, lr=3e-3, log_every=1000), log=quiet)
    for path in (tmp_path / "r" / "model", checkpoints(tmp_path / "r")[-1]):
        lm = gptchat.load_model(path)
        assert lm.config.n_layer == 2 and lm.tokenizer.chat_template
        engine = gptchat.Engine(lm)
        result = engine.generate(engine.encode("The cat"), gptchat.SamplingParams(temperature=0, max_new_tokens=8))
        assert result.completion_tokens > 0 and isinstance(result.text, str)


def test_sft_trains_on_dialogues_and_refuses_int8(corpus, tmp_path):
    d, tok, shards = corpus
    base = tmp_path / "base"
    model = tiny_model(tok, seq_len=64)
    save_native(base, model.config, model.state_dict(), tok)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS * 5))
    lm = gptchat.load_model(base)
    data = DialogueData([chats], lm.tokenizer, batch_size=4, max_len=64, seed=0, val_fraction=0.2)
    last = train(lm.model, lm.tokenizer, data, TrainSettings(out=str(tmp_path / "sft"), steps=40, lr=3e-3, kind="sft",
                                                             log_every=1000), log=quiet)
    first = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    assert last["val_loss"] < first["val_loss"] / 2, (first, last)
    out = gptchat.load_model(tmp_path / "sft" / "model")
    assert json.loads((tmp_path / "sft" / "model" / "gptchat.json").read_text())["info"]["kind"] == "sft"
    # int8 weights cannot be trained: loading them as float is refused
    q = gptchat.load_model(base, quant="int8")
    save_native(tmp_path / "int8", q.config, q.model.state_dict(), q.tokenizer)
    with pytest.raises(ModelLoadError, match="int8"):
        gptchat.load_model(tmp_path / "int8", quant="none")
    assert out.config == lm.config


def run_cli(*args, cwd, env=None, processes: int = 1):
    """`gptchat ARGS` in a subprocess (under torchrun with `processes` > 1); asserts it succeeds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GPTCHAT_CACHE=str(cwd / "cache"), **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not inside someone's torchrun
        env.pop(name, None)
    launcher = [sys.executable, "-m", "gptchat.cli"]
    if processes > 1:
        launcher[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    r = subprocess.run([*launcher, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{args}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.slow
def test_cli_tokenizer_pretrain_sft_eval_generate_export(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS * 5))
    r = run_cli("tokenizer", "train", "corpus.txt", "--vocab-size", "320", "--out", "tok", cwd=tmp_path)
    assert "bytes per token" in r.stdout
    small = ["--steps", "24", "--batch-size", "4", "--seq-len", "48", "--log-every", "8"]
    r = run_cli("pretrain", "--data", "corpus.txt", "--tokenizer", "tok", "--out", "pt", "--depth", "2", "--width", "64",
                "--heads", "2", "--save-every", "8", "--eval-every", "12", *small, cwd=tmp_path)
    assert "val_bpb" in r.stderr and "tok/s" in r.stderr and "sample @24: 'The' -> " in r.stderr
    assert len((tmp_path / "pt" / "samples.jsonl").read_text().splitlines()) == 3 * 2  # 2 prompts at steps 8, 16, 24
    r = run_cli("sft", "--model", "pt/model", "--data", "chats.jsonl", "--out", "sft", "--lr", "3e-3", "--schedule", "linear",
                *small, cwd=tmp_path)
    assert "val_loss" in r.stderr
    # (no --chats: the fixed sample prompts do not fit this model's 48-token context)
    r = run_cli("eval", "--model", "sft/model", "--text", "corpus.txt", "--run", "pt", "--report", "report", cwd=tmp_path)
    assert "bits/byte" in r.stdout, r.stdout
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "loss.png").is_file()
    r = run_cli("generate", "--model", "sft/model", "--temperature", "0", "--max-new-tokens", "8", "Where is the cat?",
                cwd=tmp_path)
    assert r.stdout.strip()
    r = run_cli("export", "--model", "sft/model", "--format", "hf", "hf", cwd=tmp_path)
    assert "LlamaForCausalLM" in r.stdout and (tmp_path / "hf" / "model.safetensors").is_file()
    # resuming a finished run changes nothing and still leaves the model
    run_cli("pretrain", "--data", "corpus.txt", "--tokenizer", "tok", "--out", "pt", "--resume", *small, cwd=tmp_path)


@pytest.mark.slow
def test_compile_falls_back_to_eager_when_it_cannot_compile(tmp_path):
    """A machine without a C++ compiler cannot build inductor's CPU kernels: --compile warns and trains
    eagerly, to the same losses as a run without it. About 40 s (tracing before the failure)."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    train_tokenizer([tmp_path / "corpus.txt"], 320)[0].save(tmp_path / "tok")
    flags = ["pretrain", "--data", "corpus.txt", "--tokenizer", "tok", "--depth", "2", "--width", "64", "--heads", "2",
             "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--sample-tokens", "0"]
    r = run_cli(*flags, "--out", "compiled", "--compile", cwd=tmp_path,
                env={"CXX": "/bin/false", "CC": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert "warning: torch.compile failed" in r.stderr and "training without it" in r.stderr
    run_cli(*flags, "--out", "eager", cwd=tmp_path)
    compiled, eager = ((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("compiled", "eager"))
    assert [json.loads(line)["loss"] for line in compiled[1:]] == [json.loads(line)["loss"] for line in eager[1:]]


def test_sft_from_a_hugging_face_directory(tiny_llama_dir, tmp_path):
    """Any model the engine loads is a base: here a transformers-saved Llama (untied head, GQA)."""
    hf_dir, _ = tiny_llama_dir
    lm = gptchat.load_model(hf_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS * 3))
    data = DialogueData([chats], lm.tokenizer, batch_size=2, max_len=64, seed=0, val_fraction=0.0)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train(lm.model, lm.tokenizer, data, TrainSettings(out=str(tmp_path / "sft"), steps=3, lr=1e-3, kind="sft"), log=quiet)
    out = gptchat.load_model(tmp_path / "sft" / "model")
    assert out.config == lm.config and out.tokenizer.chat_template == lm.tokenizer.chat_template
    assert not torch.equal(out.model.state_dict()["lm_head.weight"], before["lm_head.weight"])
