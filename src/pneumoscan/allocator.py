"""Process-wide memory settings that let PyTorch reuse the CPU memory of large tensors instead of faulting it in.

PyTorch's CPU allocator hands every tensor to malloc and back: unlike its CUDA allocator it caches nothing. glibc
serves a block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, so each
such tensor has the kernel zero and map its memory again, one 4 KiB page fault at a time. A batch of 32 images has
activations of 154 MB (EfficientNet-Lite0's first blocks: 32 x 96 x 112 x 112 floats), made and freed at every
layer. On the project's AVX2 machine the float32 network ran 1.6-1.8x faster at batch 32 with the settings below
(`PNEUMOSCAN_ALLOCATOR=default python benchmarks/bench_inference.py` against the same without it; the page faults
per image are in its network-only rows; docs/benchmarks.md).

Two settings fix it, and neither changes a single computed number:
- glibc's ``mallopt``: no mmap for large blocks (``M_MMAP_MAX`` 0) and no returning the heap's free top to the
  kernel below 1 GiB (``M_TRIM_THRESHOLD``), so a freed activation's pages are reused by the next one;
- ``THP_MEM_ALLOC_ENABLE=1``: PyTorch aligns blocks of 2 MiB and more to 2 MiB and asks for transparent huge
  pages (``madvise``), 512 times fewer page faults and TLB misses when memory is new. PyTorch reads it once, when
  it first allocates, so it only takes effect when set before torch is imported.

Why by hand: Intel's PyTorch CPU tuning guide (and ``torch.backends.xeon.run_cpu``) swaps in jemalloc or tcmalloc
through ``LD_PRELOAD``, which needs a launcher around the process and a system package; a pip-installed command
cannot do that for itself, but it can ask glibc for the same behaviour from inside. The command line calls
``tune()`` for every command before importing torch; Python users call ``pneumoscan.allocator.tune()`` first
thing (a library should not change its host process's allocator on import). ``PNEUMOSCAN_ALLOCATOR=default`` in
the environment turns both off, for comparison or if they ever misbehave. The cost is a resident size that stays
at its peak instead of shrinking between batches (peak RSS over 1,000 files: docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30
# Set by the user, these say how they want malloc to behave: then tune() leaves malloc alone.
_GLIBC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: dict[str, bool] | None = None
_set_huge_pages = False  # whether tune() itself put THP_MEM_ALLOC_ENABLE into this process's environment


def tune() -> dict[str, bool]:
    """Apply both settings where they apply (idempotent); says which did: ``{"huge_pages": .., "heap_reuse": ..}``.

    ``huge_pages`` is False when torch was imported already or THP_MEM_ALLOC_ENABLE is set to another value;
    ``heap_reuse`` is False off glibc (macOS, Windows, musl) or when the user set one of glibc's MALLOC_* variables;
    both are False under ``PNEUMOSCAN_ALLOCATOR=default``.
    """
    global _applied, _set_huge_pages
    if _applied is not None:
        return _applied
    if os.environ.get("PNEUMOSCAN_ALLOCATOR", "tuned") == "default":
        _applied = {"huge_pages": False, "heap_reuse": False}
        return _applied
    # in effect when torch loads after this; a value the user (or a parent process) set is kept
    _set_huge_pages = "torch" not in sys.modules and "THP_MEM_ALLOC_ENABLE" not in os.environ
    huge_pages = "torch" not in sys.modules and os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1") == "1"
    heap_reuse = False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and not any(
            name in os.environ for name in _GLIBC_ENV):
        try:
            libc = ctypes.CDLL(None)  # the process's own C library
            heap_reuse = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):
            pass
    _applied = {"huge_pages": huge_pages, "heap_reuse": heap_reuse}
    return _applied


def untuned_environ() -> dict[str, str]:
    """This process's environment for a child that should run with glibc's and PyTorch's defaults: the switch set
    to ``default``, and the huge-page variable dropped when ``tune()`` put it there (a user's own is kept)."""
    environ = dict(os.environ, PNEUMOSCAN_ALLOCATOR="default")
    if _set_huge_pages:
        environ.pop("THP_MEM_ALLOC_ENABLE", None)
    return environ
