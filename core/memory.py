"""How a process's C allocator treats freed memory (glibc only): for processes that move big files."""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_FROM_HEAP, _KEPT_FREE = 4 * 1024 * 1024, 16 * 1024 * 1024


def keep_freed_buffers() -> None:
    """Let glibc's malloc reuse freed buffers of a few MiB instead of handing them back to the kernel.

    A file transfer allocates and frees several 1 MiB buffers per chunk (gRPC's reads, Python
    bytes, protobuf messages). By default glibc unmaps or trims them as soon as they are free,
    and the next chunk page-faults them in again: one fault per 4 KiB moved, half or more of the
    CPU a transfer costs the receiving process. So buffers up to 4 MiB come from the heaps, up to
    16 MiB may stay free on top of a heap (what a transfer's chunks in flight come and go by), and
    two heaps (not 8 per core, one per allocating thread) bound what is kept. Every `jobwire`
    command calls it; call it first in a program of your own that moves big files with the SDK.
    A no-op with other C libraries (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for option, value in ((_M_MMAP_THRESHOLD, _FROM_HEAP), (_M_TRIM_THRESHOLD, _KEPT_FREE), (_M_ARENA_MAX, 2)):
        mallopt(option, value)
