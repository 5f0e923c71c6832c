"""How the server process's C allocator treats freed memory (glibc only)."""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_KEPT = 4 * 1024 * 1024


def keep_freed_buffers() -> None:
    """Let glibc's malloc reuse freed buffers of a few MiB instead of handing them back to the kernel.

    A file transfer allocates and frees several 1 MiB buffers per chunk (gRPC's reads, Python
    bytes, protobuf messages). By default glibc unmaps or trims them as soon as they are free,
    and the next chunk page-faults them in again: 1.5 faults per 4 KiB moved, about half of the
    server's CPU in a transfer. So buffers up to 4 MiB come from the heaps, up to 4 MiB may stay
    free on top of a heap, and two heaps (not 8 per core, one per allocating thread) bound what
    is kept. A no-op with other C libraries (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for option, value in ((_M_MMAP_THRESHOLD, _KEPT), (_M_TRIM_THRESHOLD, _KEPT), (_M_ARENA_MAX, 2)):
        mallopt(option, value)
