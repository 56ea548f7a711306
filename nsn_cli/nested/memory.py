"""Give memory back to the operating system while a large model is being converted.

Two leaks that are not bugs but still raise the peak: glibc keeps what a worker thread
freed in that thread's own heap, and the source weights stay resident (page cache
mapped into the process) after their layer has been decomposed, because transformers
memory-maps the whole checkpoint file and the mapping lives as long as any tensor in it.
Both helpers are hints: they never change data and do nothing where unsupported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

# madvise(2) advice: reclaim these pages now. Clean file-backed pages are dropped (the
# file still has them); anonymous pages go to swap if there is swap, else stay put.
MADV_PAGEOUT = 21


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def trim_heap() -> None:
    """Return memory freed on this thread to the OS. glibc gives each worker thread
    its own heap and keeps what LAPACK's workspaces freed there: without this,
    converting GPT-2 small on two workers peaks about 200 MB higher."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_pages(tensor: torch.Tensor) -> bool:
    """Ask the kernel to reclaim the whole pages under a CPU tensor that is no longer needed.

    For a weight memory-mapped from its checkpoint this drops the copy in the process's
    resident set at once (reading it again would simply fault it back in from the file),
    so converting a model does not hold the source and the factors in memory together.
    Returns whether the kernel took the hint.
    """
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    # The span the tensor's elements cover (a transposed view covers the same bytes).
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    end = start + span * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages only
    # A hint: an old kernel without MADV_PAGEOUT says EINVAL and nothing changes.
    return last > first and libc.madvise(first, last - first, MADV_PAGEOUT) == 0
