"""adjopt._memory: glibc's mmap threshold fixed so that freed arrays go back to the system."""

import ctypes
import subprocess
import sys
import textwrap

import pytest

from adjopt import _memory


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).mallopt  # noqa: B018
        return sys.platform.startswith("linux")
    except (OSError, AttributeError):
        return False


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(_memory, "_done", None)
    for var in ("ADJOPT_MALLOC", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("bad", [-1, _memory.MAX_THRESHOLD + 1, 1.5, True, "128k"])
def test_a_threshold_outside_glibcs_range_is_refused(fresh, bad):
    with pytest.raises(ValueError, match="threshold must be an int of bytes"):
        _memory.return_freed_memory(bad)


def test_adjopt_malloc_keep_leaves_the_allocator_alone(fresh):
    fresh.setenv("ADJOPT_MALLOC", "keep")
    assert _memory.return_freed_memory() is False
    assert _memory.threshold_set() is None


def test_an_unknown_adjopt_malloc_value_says_what_it_takes(fresh):
    fresh.setenv("ADJOPT_MALLOC", "off")
    with pytest.raises(ValueError, match="ADJOPT_MALLOC must be 'keep'"):
        _memory.return_freed_memory()


def test_the_users_own_glibc_setting_wins(fresh):
    fresh.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert _memory.return_freed_memory() is False
    assert _memory.threshold_set() is None


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only")
def test_set_once_and_reported(fresh):
    assert _memory.return_freed_memory() is True
    assert _memory.threshold_set() == _memory.DEFAULT_THRESHOLD
    assert _memory.return_freed_memory() is True  # again: nothing to do


SCRIPT = textwrap.dedent("""
    import re, sys
    import numpy as np
    sys.path.insert(0, {src!r})
    from adjopt import _memory
    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
    if sys.argv[1] == "fixed":
        assert _memory.return_freed_memory()
    big = np.ones(30 * 2**20 // 8); del big  # glibc's dynamic threshold rises to 30 MiB here
    before = rss()
    arrays = [np.ones(2**20 // 8) for _ in range(200)]  # 200 arrays of 1 MiB
    del arrays[::2]  # 100 MiB freed, in holes between the kept ones
    print(rss() - before)
""")


@pytest.mark.skipif(not _glibc() or not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_freed_arrays_go_back_to_the_system():
    import adjopt

    src = str(__import__("pathlib").Path(adjopt.__file__).parents[1])
    grown = {}
    for mode in ("dynamic", "fixed"):
        out = subprocess.run([sys.executable, "-c", SCRIPT.format(src=src), mode], capture_output=True, text=True,
                             check=True, env={"PATH": "/usr/bin:/bin", "ADJOPT_THREADING": "keep"})
        grown[mode] = float(out.stdout.split()[-1])
    # the 100 MiB still held in both; the 100 MiB freed stay resident only with the dynamic threshold
    assert grown["dynamic"] > 170, grown
    assert grown["fixed"] < 140, grown
