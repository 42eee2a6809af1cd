"""gptchat.pages: file-backed pages given back to the kernel, and nothing lost when they are."""

import ctypes
import json
import mmap
import re
import subprocess
import sys

import pytest
import torch

from gptchat import pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")


def resident_kib(path) -> int:
    """Resident KiB of this process's mappings of `path`, from smaps."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip("\n").endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_released_file_pages_read_back_and_anonymous_memory_is_kept(tmp_path):
    """After conversion a layer releases its portable tensors' pages when they are mapped from a checkpoint
    file: read again they come back from the file; tensors in anonymous memory are never touched."""
    from safetensors.torch import load_file, save_file

    big = torch.arange(1 << 20, dtype=torch.int32).to(torch.uint8).view(1024, 1024)
    save_file({"w": big}, str(tmp_path / "t.safetensors"))
    mapped = load_file(str(tmp_path / "t.safetensors"))["w"]
    anonymous = big.clone()
    pages.release_file_pages([mapped, anonymous])
    assert torch.equal(mapped, big) and torch.equal(anonymous, big)


@linux_only
def test_only_clean_code_pages_are_released(tmp_path):
    """A file mapped executable and only read is released (its pages leave the resident set) and reads back
    the file; one holding a private copy of a page (written, then made executable) is left as it is."""
    size = 16 * mmap.PAGESIZE
    original = bytes(range(256)) * (size // 256)
    (tmp_path / "clean.bin").write_bytes(original)
    (tmp_path / "dirty.bin").write_bytes(original)
    with open(tmp_path / "clean.bin", "rb") as f:
        try:
            clean = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
        except OSError:
            pytest.skip("executable file mappings are not allowed here (a noexec mount)")
    with open(tmp_path / "dirty.bin", "r+b") as f:
        dirty = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    written = bytes(reversed(original))
    dirty[:] = written
    view = ctypes.c_char.from_buffer(dirty)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.mprotect(ctypes.addressof(view), size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        pytest.skip("mprotect to an executable mapping is not allowed here")
    try:
        assert clean[:] == original  # read: resident
        assert resident_kib(tmp_path / "clean.bin") == size // 1024
        released = pages.release_idle_code()
        assert released >= size
        assert resident_kib(tmp_path / "clean.bin") == 0
        assert resident_kib(tmp_path / "dirty.bin") == size // 1024
        assert clean[:] == original and dirty[:] == written
    finally:
        libc.mprotect(ctypes.addressof(view), size, mmap.PROT_READ | mmap.PROT_WRITE)
        del view
        clean.close()
        dirty.close()


RELEASE_TORCH_CODE = """
import json, torch
from gptchat import pages
def resident(): return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
before_product = torch.softmax(x @ x.T, -1)
mappings = pages.idle_code_mappings()
before = resident()
released = pages.release_idle_code()
after = resident()
same = torch.equal(torch.softmax(x @ x.T, -1), before_product)
print(json.dumps({"released": released, "dropped": before - after, "same": same,
                  "paths": len(mappings), "again": pages.release_idle_code()}))
"""


@linux_only
def test_torch_code_pages_are_released_and_torch_still_runs():
    """In a fresh process: after `import torch`, tens of MiB of its code are resident; they are released
    (RSS drops by about as much) and torch computes the same afterwards."""
    out = subprocess.run([sys.executable, "-c", RELEASE_TORCH_CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["released"] > 20 * 2**20
    assert result["dropped"] > result["released"] // 2
    assert result["same"]
    assert result["again"] < result["released"] // 4  # what came back is only the code run since


@linux_only
def test_trim_heap_gives_back_freed_heap_memory():
    """Blocks freed in the middle of the heap stay resident (glibc keeps them for reuse) until trim_heap."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        pytest.skip("not glibc")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    blocks = [libc.malloc(64 * 1024) for _ in range(1024)]  # 64 MiB of heap blocks (below mmap's threshold)
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    keep = libc.malloc(64 * 1024)  # above them: freeing them does not shrink the heap from its top
    for b in blocks:
        libc.free(b)
    before = resident_kib("[heap]")  # the brk area, where glibc's malloc puts small blocks
    assert pages.trim_heap()
    after = resident_kib("[heap]")
    libc.free(keep)
    assert before - after > 48 * 1024, (before, after)
