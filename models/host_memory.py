"""Host (CPU) memory and glibc's allocator: when to give freed memory back, when to keep it.

PyTorch's CPU allocator is plain ``malloc``, so how much resident memory a process holds, and how
often it page-faults, is glibc's policy. Two moments want opposite policies:

- loading with quantization (``return_freed_host_memory``): each weight's transient quantizer
  scratch should go back to the OS at once, or the resident size ratchets up tensor by tensor;
- training on CPU (``keep_freed_host_memory``): the same large buffers are freed and re-allocated
  every step, and handing them back only to fault them in again costs time.

Both are no-ops off Linux/glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest value glibc accepts on 64-bit


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # musl has neither


def return_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Quantizing one weight allocates a transient [values × 16] distance table (~30× the bf16
    weight). glibc keeps such freed blocks in the process heap, so without this the resident size
    ratchets up tensor by tensor and a quantize-while-loading run peaks *above* a dense load.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_host_memory(device: torch.device) -> bool:
    """On CPU, keep freed memory in the process for the next step instead of returning it to the OS.

    A training step frees and re-allocates the same large buffers (a chunk's [c × v] logits and
    their gradient, the MLP activations) every step, and glibc hands most of them back to the OS in
    between (``mmap``/``munmap`` for blocks over its threshold, heap trimming for the rest), so
    every step page-faults its buffers in again: +4% tokens/s without that on a SmolLM2 bf16 step
    on 2 cores (BENCHMARKS.md). This serves blocks up to 32 MiB from the heap and stops trimming it,
    the CPU counterpart of the CUDA caching allocator. The trade-off: the process stays at its peak
    resident size after a step (it reaches that peak anyway), and blocks kept in the heap can
    fragment it a little: peak RSS was unchanged in the bf16 benchmark and 1.4% higher
    (2.48 → 2.52 GiB) in 20 steps of the fp32 demo config. Recipes call it after loading, so
    loading keeps ``return_freed_host_memory``'s behaviour.

    Does nothing off Linux/glibc, on CUDA, or when the user set glibc's own ``MALLOC_TRIM_THRESHOLD_``
    or ``MALLOC_MMAP_THRESHOLD_`` environment variables (theirs win).

    Args:
        device: The training device; only ``cpu`` is affected.

    Returns:
        True when the setting was applied.
    """
    if device.type != "cpu" or "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either one also turns off glibc's own adaptive thresholds, so both are set.
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
