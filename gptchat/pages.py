"""File-backed memory this process has read and no longer needs, given back to the kernel.

A page of a file mapped into memory counts in the process's resident set (RSS) from the first read until the
mapping goes away, even when it is never read again. Two such kinds are large here:
- a checkpoint's tensors, memory-mapped by safetensors and read once to convert them to the kernel layout
  (`release_file_pages`, called by each converted layer);
- the machine code of torch's libraries. `import torch` runs libtorch's start-up code, which registers
  thousands of operators, and loading a model runs more code once; ~75 MiB of code pages stay resident, of
  which a chat then uses ~25 (`release_idle_code`).

`madvise(MADV_DONTNEED)` drops the process's mapping of such pages. They are clean copies of the file (the
page cache keeps them while memory allows), so nothing is lost: a page read again is mapped again, at the
cost of a page fault. Linux only; elsewhere, and if anything fails, these do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MADV_DONTNEED = 4


@functools.cache
def _libc_function(name: str, *argtypes):
    """libc's function `name` taking `argtypes` (returning int), or None where it cannot be had (not Linux, or
    not in this libc: musl has no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def _madvise_call():
    """libc's madvise, or None where it cannot be had (not Linux)."""
    return _libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's file-backed memory mappings (Linux; else none)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if " /" in line:
                    lo, _, hi = line.partition(" ")[0].partition("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def release_file_pages(tensors: list[torch.Tensor], mappings: list[tuple[int, int]] | None = None) -> None:
    """Give back this process's pages of tensors memory-mapped from a file (a checkpoint loaded by safetensors)
    that a layer has just replaced by their kernel-layout copy. Read once for the conversion, those pages stay
    resident, and count in the process's memory, for as long as the file's mapping lives, which is as long
    as any tensor of the file does. Read again, they would come back from the file. Only whole pages inside
    file-backed mappings (`mappings`: file_mappings(), current) are released, never anonymous memory, which
    MADV_DONTNEED would zero."""
    madvise = _madvise_call()
    if madvise is None:
        return
    mappings = file_mappings() if mappings is None else mappings
    page = os.sysconf("SC_PAGE_SIZE")
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            continue
        start = -(-t.data_ptr() // page) * page
        end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
        if end > start and any(lo <= start and end <= hi for lo, hi in mappings):
            madvise(start, end - start, MADV_DONTNEED)


def idle_code_mappings() -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of each mapping of machine code from a file that can be released without
    losing anything: executable, not writable, and holding no private copy of any page (smaps' Anonymous is
    0), so every resident page is the file's own."""
    try:
        with open("/proc/self/smaps") as smaps:
            text = smaps.read()
    except OSError:
        return []
    found = []
    for mapping in re.split(r"^(?=[0-9a-f]+-[0-9a-f]+ )", text, flags=re.M)[1:]:
        header, _, fields = mapping.partition("\n")
        span, perms, *rest = header.split(maxsplit=5)
        path = rest[-1] if len(rest) == 4 else ""
        if "x" not in perms or "w" in perms or not path.startswith("/"):
            continue
        kib = dict(re.findall(r"^(\w+):\s+(\d+) kB", fields, re.M))
        if kib.get("Anonymous") == "0" and int(kib.get("Rss", 0)):
            lo, hi = (int(x, 16) for x in span.split("-"))
            found.append((lo, hi, int(kib["Rss"]) * 1024))
    return found


def release_idle_code() -> int:
    """Drop the resident pages of the process's file-backed machine code; return how many bytes were
    resident there. Called once start-up is over (torch imported, the model loaded and readied): most of
    that code ran once and will not run again. What does run again is mapped again on its first use."""
    madvise = _madvise_call()
    if madvise is None:
        return 0
    released = 0
    for start, end, rss in idle_code_mappings():
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += rss
    return released


def trim_heap() -> bool:
    """Give the C heap's free memory back to the kernel (glibc's malloc_trim); whether any was. Loading
    SmolLM2 leaves ~15 MiB of the heap freed but resident, kept by the allocator for reuse; converted weights
    used to reuse it, memory-mapped ones do not. Elsewhere than glibc, nothing."""
    malloc_trim = _libc_function("malloc_trim", ctypes.c_size_t)
    return bool(malloc_trim and malloc_trim(0))
