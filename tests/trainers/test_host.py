import ctypes
import subprocess
import sys

import pytest

from rlhf.config import ConfigError, load_config

# In a fresh process (the setting is process-wide): how many bytes are mmap'ed while a 16 MiB block is live.
PROBE = """
import ctypes, sys
from rlhf.trainers.host import set_malloc_mmap_threshold
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                  "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = set_malloc_mmap_threshold(int(sys.argv[1]))
before = libc.mallinfo2().hblkhd
buf = ctypes.create_string_buffer(16 << 20)
print(applied, libc.mallinfo2().hblkhd - before)
"""


def _probe(mb: int) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(mb)], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_mmap_threshold_keeps_step_sized_blocks_in_the_heap():
    applied, mapped = _probe(0)
    assert applied == "False" and mapped >= 16 << 20  # glibc's default: a 16 MiB block is mmap'ed
    applied, mapped = _probe(32)
    assert applied == "True" and mapped == 0  # now it comes from the heap


def test_threshold_is_validated():
    with pytest.raises(ConfigError, match="speed.malloc_mmap_threshold_mb"):
        load_config(None, ["speed.malloc_mmap_threshold_mb=64"]).validate()
    with pytest.raises(ConfigError, match="moved to 'speed.malloc_mmap_threshold_mb'"):
        load_config(None, ["train.malloc_mmap_threshold_mb=16"])
