"""Training on several processes: `torchrun --nproc_per_node 2` (gloo, CPU) against one process.

The global batch is the same whatever the number of processes, so the two runs give the same loss
curve (up to float summation order); a DDP run resumes exactly from its checkpoint. Five CLI runs, three
of them with two processes, on a 2-layer model of width 64: about 2 minutes on a busy 2-core machine.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import gptchat
from gptchat.tokenizer_train import train_tokenizer
from test_train import TEXT, run_cli

DIALOGUES = [  # of different lengths: the two ranks' shares hold different numbers of assistant tokens
    {"messages": [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "On the mat."}]},
    {"messages": [{"role": "user", "content": "Where is the dog?"},
                  {"role": "assistant", "content": "In the park, running after a ball."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
]


def run(args, cwd, processes: int = 1):
    return run_cli(*args, cwd=cwd, processes=processes)


def losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    (d / "corpus.txt").write_text(TEXT)
    (d / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in DIALOGUES * 4))
    tok, _ = train_tokenizer([d / "corpus.txt"], 320)
    tok.save(d / "tok")
    return d


PRETRAIN = ["pretrain", "--data", "corpus.txt", "--tokenizer", "tok", "--depth", "2", "--width", "64", "--heads", "2",
            "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--steps", "6", "--save-every", "2", "--keep", "3",
            "--eval-every", "3", "--lr", "3e-3", "--dtype", "fp32", "--sample-tokens", "0"]


@pytest.mark.slow
def test_two_processes_give_the_loss_curve_of_one_and_resume_exactly(workdir):
    run([*PRETRAIN, "--out", "one"], workdir)
    r = run([*PRETRAIN, "--out", "two"], workdir, processes=2)
    assert "x 2 processes" in r.stderr
    one, two = losses(workdir / "one"), losses(workdir / "two")
    assert sorted(one) == sorted(two) == list(range(7))  # rank 0 alone writes metrics: each step once
    for step in one:
        for key in ("loss", "val_loss"):
            if key in one[step]:
                assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-5), (step, key)
    a = gptchat.load_model(workdir / "one" / "model").model.state_dict()
    b = gptchat.load_model(workdir / "two" / "model").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # interrupted after step 4 (its last checkpoint and model gone): two processes resume and finish exactly
    shutil.copytree(workdir / "two" / "model", workdir / "straight")
    shutil.rmtree(workdir / "two" / "step-000006")
    shutil.rmtree(workdir / "two" / "model")
    r = run([*PRETRAIN, "--out", "two", "--resume"], workdir, processes=2)
    assert "resuming from" in r.stderr and "step-000004" in r.stderr
    c = gptchat.load_model(workdir / "two" / "model").model.state_dict()
    d = gptchat.load_model(workdir / "straight").model.state_dict()
    for k in c:
        assert torch.equal(c[k], d[k]), k
    assert sorted(losses(workdir / "two")) == list(range(7))


@pytest.mark.slow
def test_sft_masked_loss_is_the_same_on_two_processes(workdir, tiny_llama_dir):
    """Conversations differ in length, so the ranks hold different numbers of assistant tokens: the loss
    must still be the mean over the global batch's assistant tokens."""
    sft = ["sft", "--model", tiny_llama_dir[0], "--data", "chats.jsonl", "--batch-size", "4", "--steps", "3", "--lr", "3e-3",
           "--dtype", "fp32", "--sample-tokens", "0", "--val-fraction", "0.25"]
    run([*sft, "--out", "sft1"], workdir)
    run([*sft, "--out", "sft2"], workdir, processes=2)
    one, two = losses(workdir / "sft1"), losses(workdir / "sft2")
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for step in one:
        for key in ("loss", "val_loss"):
            if key in one[step]:
                assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-5), (step, key)
