"""The decode step compiled ahead of time: one token through the whole model as one native library.

Decoding eagerly costs ~50 small PyTorch ops per layer, each a few microseconds of dispatch, and at batch 1
on a CPU those fixed costs are about half of a token's time. Here the step is traced once with
`torch.export` and compiled by AOTInductor into a shared library, packaged (`.pt2`) under gptchat's
cache: the small ops are fused into a few C++ loops, and no Python runs between them. Later processes
load the package in a fraction of a second instead of compiling again.

The graph must not change from token to token, so the step takes the position as a tensor and writes
this token's keys and values into the cache in place at that position; it attends over the first
`window` positions, where window (pos + 1) is passed as the length of a small tensor, a dynamic size, as
is the cache's capacity: one package serves every step of a cache that grows by doubling.

Where gptchat's own kernel serves the quantized layers, every weight the step reads is one of the model's
own tensors (in the kernel's layout, which the layers then hold in memory), so the package holds code only (a few MB) and is handed the model's tensors when it loads
(AOTInductor's user-managed constants): the weights are in memory once, loading takes milliseconds, and a
package serves every model of the same architecture and quantization (a fine-tune reuses its base's).
On PyTorch's kernels the step reads weight copies in those kernels' layout, which the package embeds;
such a package belongs to one model's weights. A package's file name is a fingerprint of what it
depends on: the architecture and weight layout (and, when embedded, the weights), gptchat's source, this
torch and this CPU; packages no run has loaded for a month are removed at the next build. The fused loops are compiled single-threaded
(they touch a few thousand numbers each; spreading them over threads costs a barrier each, and on a
machine shared with other work a barrier waits for a descheduled thread), while the quantized matmuls
inside stay calls to their kernels (gptchat/kernels, else PyTorch's), which use all of torch's threads.

Two packages per model: one sequence (chat, generate, a lone server request), and a batch of any size from 2
(the server's running batch, generate_batch): left-padded rows, each at its own position, with a key mask; its
batch size is a dynamic dimension, so one package serves every batch up to MAX_BATCH rows.

Where compiling or loading fails (no C++ compiler, an op inductor cannot handle), the decoder says so
once and the engine decodes eagerly; a failed build leaves a note beside where the package would be, so
later runs do not spend minutes failing again (delete it to retry).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn as nn

from . import kernels
from .cpu import cpu_flags
from .model import GPT, KVCache
from .quantize import SMALL_BATCH, use_kernel_layout

PACKAGE_VERSION = 2  # bump when the step's graph changes in a way the fingerprint cannot see
# rows of the batched step: beyond this, the quantized layers take another path where gptchat's kernel is
# unavailable (PyTorch's kernels serve at most SMALL_BATCH rows), which a graph traced with fewer rows does not hold
MAX_BATCH = SMALL_BATCH


class StepCache:
    """The KV cache as the compiled step sees it: this token's keys/values go in at `pos` (a tensor), and
    attention reads the first `window` positions. Each layer's keys and values are
    their own input tensor: a write into a whole input compiles to an in-place store, while a write into
    a view of one big input would copy the whole cache around it at every step."""

    def __init__(self, ks: tuple[torch.Tensor, ...], vs: tuple[torch.Tensor, ...], pos: torch.Tensor, window: int):
        self.ks, self.vs, self.pos, self.window = ks, vs, pos, window

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.ks[layer][:, :, self.pos] = k.to(self.ks[layer].dtype)
        self.vs[layer][:, :, self.pos] = v.to(self.vs[layer].dtype)
        return self.ks[layer][:, :, : self.window], self.vs[layer][:, :, : self.window]


class DecodeStep(nn.Module):
    """Logits [B, vocab] for one new token per row, idx [B, 1], at position pos [1], window [pos + 1] (only
    its length counts); the cache tensors (each layer's keys, then each layer's values, [B, kv heads,
    capacity, head dim]) receive its keys and values."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, window: torch.Tensor, *cache_tensors: torch.Tensor):
        m = self.model
        n = len(m.blocks)
        x, rope = m.embed(idx, pos.expand(idx.shape[0], 1))
        cache = StepCache(cache_tensors[:n], cache_tensors[n:], pos, window.shape[0])
        for i, block in enumerate(m.blocks):  # one query that sees every key in the window: no mask
            x = block(x, rope, cache, i, None)
        return m.head(m.norm(x))[:, -1]


class BatchDecodeStep(nn.Module):
    """Logits [B, vocab] for one new token per row of a DecodeBatch: idx and positions [B, 1] (each row's own
    position), column [1] (where this token's keys go: the same cache column for every row, which are
    left-padded), key_mask [B, column + 1] (False for padding); then the cache tensors, as in DecodeStep."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, positions, column, key_mask, *cache_tensors):
        m = self.model
        n = len(m.blocks)
        x, rope = m.embed(idx, positions)
        cache = StepCache(cache_tensors[:n], cache_tensors[n:], column, key_mask.shape[1])
        mask = key_mask[:, None, None, :]  # [B, 1, 1, window]: the one query of each row
        for i, block in enumerate(m.blocks):
            x = block(x, rope, cache, i, mask)
        return m.head(m.norm(x))[:, -1]


def prepare_kernels(model: nn.Module) -> None:
    """Put the quantized layers' tensors in their kernel's layout now, so that the trace holds them as they are:
    gptchat's own kernel's layout (the model's tensors, converted in place), or else PyTorch's kernels'
    (derived copies)."""
    if kernels.ops() is not None:
        use_kernel_layout(model)
        return
    for m in model.modules():
        if hasattr(m, "kernel") and callable(m.kernel):
            m.kernel()


def drop_kernels(model: nn.Module) -> None:
    """Forget the derived kernel tensors (the package holds its own copy); eager code derives them again."""
    for m in model.modules():
        if hasattr(m, "_kernel"):
            m._kernel = None


def weights_outside() -> bool:
    """Whether packages read the model's own tensors (gptchat's kernel) rather than embedding copies."""
    return kernels.ops() is not None


def fingerprint(model: GPT) -> str:
    """Identifies a package: the model's config and tensors (names, shapes, dtypes; and an even sample of
    every tensor's values when the package embeds them), the gptchat source that shapes the graph (and
    whether gptchat's own kernel serves the quantized layers), torch and the CPU."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("compiled.py", "model.py", "quantize.py", "kernels/quant_matmul.cpp"):
        h.update((here / name).read_bytes())
    outside = weights_outside()
    h.update(b"own kernel, weights outside" if outside else b"aten kernels, weights embedded")
    h.update(f"{PACKAGE_VERSION}|{torch.__version__}|{sorted(cpu_flags())}|{model.cache_dtype()}".encode())
    h.update(repr(sorted(model.config.to_dict().items())).encode())
    if outside:
        use_kernel_layout(model)  # the tensors as the package reads them (not the state dict's portable form)
    for name, t in model_tensors(model).items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if not outside:
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(flat[::step].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by the names the exported step gives them (tied ones twice)."""
    step = DecodeStep(model)
    named = dict(step.named_parameters(remove_duplicate=False))
    named.update(step.named_buffers(remove_duplicate=False))
    return {name: t.detach() for name, t in named.items()}


def package_path(model: GPT, batched: bool = False) -> Path:
    from .checkpoints import cache_root

    return cache_root() / "compiled" / f"decode-{'batch-' if batched else ''}{fingerprint(model)}.pt2"


def build_package(model: GPT, path: Path, batched: bool = False) -> None:
    """Export the decode step of `model` (one sequence, or a batch) and compile it into `path` (atomically)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecations inside export and inductor
        export_and_compile(model, path, batched)


def exported_step(model: GPT, batched: bool):
    """torch.export of the step, with the cache capacity, the attention window (and the batch) dynamic."""
    config = model.config
    capacity, rows = min(config.max_seq_len, 64), 2 if batched else 1
    shape = (rows, config.n_kv_head, capacity, config.head_dim)
    caches = tuple(torch.zeros(shape, dtype=model.cache_dtype()) for _ in range(2 * config.n_layer))  # no aliasing
    dim = torch.export.Dim("capacity", min=2, max=config.max_seq_len)
    window = torch.export.Dim("window", min=2, max=config.max_seq_len)
    column = capacity // 2
    if batched:
        batch = torch.export.Dim("batch", min=2, max=MAX_BATCH)
        example = (torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), column), torch.tensor([column]),
                   torch.ones(rows, column + 1, dtype=torch.bool), *caches)
        dynamic = ({0: batch}, {0: batch}, None, {0: batch, 1: window}, ({0: batch, 2: dim},) * len(caches))
        step = BatchDecodeStep(model)
    else:
        example = (torch.tensor([[0]]), torch.tensor([column]), torch.empty(column + 1), *caches)
        dynamic = (None, None, {0: window}, ({2: dim},) * len(caches))
        step = DecodeStep(model)
    with torch.inference_mode():
        return torch.export.export(step, example, strict=False, dynamic_shapes=dynamic)


_build_dir: Path | None = None
STALE_LEGACY_S = 3600  # the shared folder of older versions goes once no build has touched it for this long
UNUSED_PACKAGE_S = 30 * 24 * 3600  # a package not loaded for this long is removed at the next build


def remove_unused_packages(compiled: Path, keep: Path) -> None:
    """Remove packages (and failure markers) that no run has loaded for UNUSED_PACKAGE_S: a package's name is
    a fingerprint of gptchat's source, torch and the model, so every update of either leaves the old ones
    (~4 MB each, a model's weights when they are embedded) where nothing reads them again. Loading a package
    touches it (`touch_package`); a build, rare, is when the folder is swept."""
    now = time.time()
    for entry in compiled.glob("decode-*"):
        if entry.suffix in (".pt2", ".failed") and entry != keep:
            try:
                if now - entry.stat().st_mtime > UNUSED_PACKAGE_S:
                    entry.unlink()
            except OSError:
                pass


def touch_package(path: Path) -> None:
    """Mark a package as used now (its modification time), for remove_unused_packages; best effort."""
    try:
        os.utime(path)
    except OSError:
        pass


def inductor_build_dir(compiled: Path) -> Path:
    """Where inductor works while building (TORCHINDUCTOR_CACHE_DIR): a folder of this process's own beside
    the packages, removed when the process ends. Inductor leaves ~18 MB there per build (generated sources,
    objects, its caches) that no later run reads: a package is rebuilt only after gptchat, torch, the model's
    architecture or the CPU changed, and then inductor's keys differ too. It stays one folder for the whole
    process, as inductor remembers paths in it from one build to the next. Folders left by processes that
    died, and the shared `inductor` folder earlier versions kept growing, are removed here."""
    global _build_dir
    if _build_dir is None:
        remove_stale_build_dirs(compiled)
        compiled.mkdir(parents=True, exist_ok=True)
        _build_dir = Path(tempfile.mkdtemp(dir=compiled, prefix=f".inductor-{os.getpid()}-"))
        atexit.register(remove_build_dir, _build_dir, os.getpid())
    return _build_dir


def remove_build_dir(path: Path, owner: int) -> None:
    """At exit: the build folder, by the process that made it only (a forked child inherits the handler)."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_build_dirs(compiled: Path) -> None:
    """Remove build folders whose process is gone, and the legacy shared one once it is an hour old."""
    if not compiled.is_dir():
        return
    for entry in compiled.iterdir():
        if entry.name.startswith(".inductor-"):
            pid = entry.name.split("-")[1]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.name == "inductor" and entry.is_dir():
            try:
                if time.time() - entry.stat().st_mtime > STALE_LEGACY_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process (EPERM): alive
        return True
    return True


def export_and_compile(model: GPT, path: Path, batched: bool = False) -> None:
    prepare_kernels(model)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, str(_build_dir)):  # the user's own setting is kept
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_build_dir(path.parent))
    program = exported_step(model, batched)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".pt2")
    os.close(fd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP in the generated loops (see the module docstring)
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=tmp,
            # no precompiled headers: ~300 MB left in the temporary folder (torchinductor_<user>) at the
            # first build, and builds that found them there took as long (35-41 s for a tiny model either way)
            inductor_configs={"aot_inductor.package_constants_in_so": not weights_outside(),
                              "aot_inductor.precompile_headers": False})
        os.replace(tmp, path)
        remove_unused_packages(path.parent, keep=path)
    finally:
        torch.set_num_threads(threads)
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_package(path: Path):
    """The package's runner, through AOTInductor's C++ loader itself: torch._inductor.aoti_load_package
    would first import the compiler stack (torch._dynamo, ~3 s here) that running a package never needs."""
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)  # one runner, on the CPU


_loaded: weakref.WeakSet = weakref.WeakSet()  # decoders holding a loaded package


@atexit.register
def close_all() -> None:
    """Unload every package at exit. The loader unpacks a package into a temporary folder (aotinductor_*,
    ~4 MB) and deletes it when the runner is freed, which a process that ends with os._exit (the command's
    quick exit) or keeps the decoder to the end never did: one folder left behind per run."""
    for decoder in list(_loaded):
        decoder.close()


class CompiledDecoder:
    """Decodes one token for a KVCache of batch size 1 through the compiled package; None when it cannot
    (the caller decodes eagerly). The package is built on first use if it is not in the cache yet."""

    batched = False
    step = "decode step"  # in messages

    def __init__(self, model: GPT, announce: bool = True):
        self.model = model
        self.announce = announce
        self.failed = False
        self._runner = None
        self._closed = False
        self.cache_dtype = model.cache_dtype()  # the package's cache tensors (others decode eagerly)
        # small inputs written in place from call to call: a fresh torch.tensor cost ~20 us right after a step
        self._token, self._pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        self._window = torch.empty(0)

    def _fail(self, what: str, e: Exception) -> None:
        self.failed = True
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        warnings.warn(f"{what} failed ({type(e).__name__}: {first}); decoding without it")

    def close(self) -> None:
        """Unload the package (its unpacked copy is deleted); later calls return None: eager decoding."""
        self._closed = True
        self._runner = self._constants = None
        _loaded.discard(self)

    def load(self):
        """The loaded package (building it first if needed), or None if that failed or it was closed."""
        if self._closed:
            return None
        if self._runner is None and not self.failed:
            path = None
            try:
                path = package_path(self.model, self.batched)
                failed_before = path.with_suffix(".failed")
                if failed_before.is_file() and not path.is_file():
                    self.failed = True
                    return None
                if not path.is_file():
                    if self.announce:
                        print(f"gptchat: compiling the {self.step} for this model, once (a minute or more; "
                              "later runs load it from the cache)...", file=sys.stderr, flush=True)
                    start = time.perf_counter()
                    build_package(self.model, path, self.batched)
                    if self.announce:
                        print(f"gptchat: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
                kernels.ops()  # the package calls gptchat's kernel ops: load them first
                runner = load_package(path)
                touch_package(path)
                if weights_outside():
                    self._give_weights(runner)
                else:
                    drop_kernels(self.model)  # the package has its own copy of the kernel tensors
                self._runner = runner
                _loaded.add(self)
            except Exception as e:  # no compiler, an op that cannot be compiled, a damaged package
                self._fail(f"compiling the {self.step}", e)
                if path is not None:
                    try:
                        path.unlink(missing_ok=True)  # a package that does not load is rebuilt next time
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.with_suffix(".failed").write_text(f"{type(e).__name__}: {e}\n")
                    except OSError:
                        pass
        return None if self.failed else self._runner  # a step that failed once is not run again

    def _give_weights(self, runner) -> None:
        """Point the package at the model's own tensors (no copy: they must outlive the package, and
        the model's weights are never replaced while an engine uses it)."""
        tensors = model_tensors(self.model)
        wanted = runner.get_constant_fqns()
        missing = [name for name in wanted if name not in tensors]
        if missing:
            raise RuntimeError(f"the package reads tensors the model does not have: {', '.join(missing[:3])}")
        self._constants = {name: tensors[name] for name in wanted}
        runner.load_constants(self._constants, False, True, True, False)  # cpu, full update, user-managed

    @torch.inference_mode()
    def __call__(self, token: int, cache: KVCache) -> torch.Tensor | None:
        """The next logits [vocab] (the cache advanced by one), or None to decode eagerly instead."""
        if cache.batch_size != 1 or cache.length < 1 or self.load() is None or cache.dtype != self.cache_dtype:
            return None
        pos = cache.length
        cache.reserve(pos + 1)
        self._token.numpy()[0, 0], self._pos.numpy()[0] = token, pos
        logits = self._run([self._token, self._pos, self._window_of(pos + 1)], cache)
        return logits[0] if logits is not None else None

    def _window_of(self, n: int) -> torch.Tensor:
        """A tensor of n elements (the step reads only its length): a view of one kept from call to call."""
        if self._window.numel() < n:
            self._window = torch.empty(max(n, 2 * self._window.numel(), 256))
        return self._window[:n]

    def _run(self, inputs: list[torch.Tensor], cache: KVCache) -> torch.Tensor | None:
        """The package's logits for these inputs and the cache's layers (then advanced by one), or None if
        the run failed (said once; the caller decodes eagerly from then on)."""
        try:
            logits, = self._runner.boxed_run([*inputs, *cache.layers()])
        except Exception as e:
            self._fail(f"the compiled {self.step}", e)
            return None
        cache.advance(1)
        return logits


class CompiledBatchDecoder(CompiledDecoder):
    """Decodes one token for every row of a DecodeBatch (2 or more rows, left-padded, each at its own position)
    through the batched package; None when it cannot (the caller decodes eagerly)."""

    batched = True
    step = "batched decode step"

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                 cache: KVCache) -> torch.Tensor | None:
        """Logits [B, vocab] for tokens and positions [B, 1]; key_mask [B, cache.length + 1] marks real keys."""
        if not 2 <= cache.batch_size <= MAX_BATCH or self.load() is None or cache.dtype != self.cache_dtype:
            return None
        column = cache.length
        cache.reserve(column + 1)
        if not (cache.k.is_contiguous() and cache.v.is_contiguous()):  # the package assumes dense layers
            return None
        self._pos.numpy()[0] = column
        return self._run([tokens, positions, self._pos, key_mask], cache)
