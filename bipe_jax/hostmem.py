"""Keep freed host memory in the process (glibc malloc), so steps stop page-faulting.

XLA:CPU takes every execution's buffers from malloc. glibc serves blocks above
its mmap threshold (32 MiB at most) with fresh pages from mmap and unmaps them
on free, and threads other than the main one allocate from their own arenas,
whose heaps it also gives back; so each training step faults its large
temporaries in anew, page by page (about 530,000 minor faults, 2 GB, per
step of the 151M model at 1024 tokens; 1.3 s of kernel time on a 2-core
x86 CPU; see BENCHMARKS.md). `retain_freed_memory()` makes malloc keep what
is freed for the next step: no mmap'd blocks, one arena, no trimming. The
process's peak resident memory is unchanged; what it holds between steps
stays resident.

Call it before JAX starts (the programs' entry points and the benchmarks do):
threads that already own an arena keep it. A no-op away from glibc.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


# The same settings for a process started from outside (glibc tunables, read at
# start-up), for programs that do not call `retain_freed_memory()`; the trim
# threshold is 4 GiB there rather than off.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1"


def retain_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory; False where there is no glibc."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  # A trim threshold of -1 turns trimming off (mallopt(3)).
  settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1))
  return all(mallopt(param, value) == 1 for param, value in settings)
