"""hostmem.retain_freed_memory: a freed large block is reused without page faults."""
import os
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from bipe_jax import hostmem
    if sys.argv[1] == "retain":
      assert hostmem.retain_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    faults = []
    for _ in range(2):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      libc.free(p)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(faults[1])
""")


def _second_faults(mode: str, **env) -> int:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True, env=dict(os.environ, **env))
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_block_is_reused_without_page_faults():
  """Without the setting glibc unmaps the 64 MiB block on free and faults its
  16,384 pages in again; with it the second use faults (almost) none."""
  pages = (64 << 20) // 4096
  assert _second_faults("default") > pages // 2
  assert _second_faults("retain") < pages // 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_glibc_tunables_give_the_same_reuse_to_a_process_started_with_them():
  """hostmem.GLIBC_TUNABLES (what benchmarks give the release's process) has the effect
  of retain_freed_memory() on a process that never calls it."""
  from bipe_jax import hostmem
  pages = (64 << 20) // 4096
  assert _second_faults("default", GLIBC_TUNABLES=hostmem.GLIBC_TUNABLES) < pages // 100
