"""Freed heap memory goes back to the operating system."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import sys
import torch
from lightning_compress.core.heap import map_large_allocations, return_free_heap

if sys.argv[1] == "map":
    assert map_large_allocations()

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

# Freeing a 4 MiB tensor (its own mapping) raises glibc's threshold for such mappings, so the
# 1 MiB tensors after it come from the heap; every other one is freed, the others stay alive
# (as a block's weights and statistics are freed while smaller records made with them stay).
big = torch.ones(4 << 20, dtype=torch.uint8)
del big
start = anon_mib()
tensors = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(128)]
del tensors[::2]
held = anon_mib() - start
if sys.argv[1] == "trim":
    assert return_free_heap()
print(held, anon_mib() - start)
"""


def _resident_mib(mode: str) -> tuple[float, float]:
    """Runs SCRIPT in a fresh interpreter (its heap holds nothing but the script's tensors).

    Returns:
        MiB resident above the start after freeing half of 128 MiB, and at the end.
    """
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    held, after = (float(value) for value in result.stdout.split())
    return held, after


GLIBC_LINUX = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim, mallopt and /proc/self/status are glibc and Linux's",
)


@GLIBC_LINUX
def test_return_free_heap_gives_freed_tensors_memory_back_to_the_system():
    held, after = _resident_mib("trim")
    # 128 MiB made, 64 MiB freed: all of it resident before trimming, the freed half not after
    assert held >= 112, f"the freed 64 MiB were not kept resident ({held:.1f} MiB): setup void"
    assert after <= held - 48, f"{held:.1f} MiB resident before trimming, {after:.1f} MiB after"


@GLIBC_LINUX
def test_after_map_large_allocations_freed_tensors_leave_memory_at_once():
    held, after = _resident_mib("map")
    # 128 MiB made, 64 MiB freed: only the live half stays resident, without trimming
    assert held <= 80, f"{held:.1f} MiB resident after freeing 64 of 128 MiB"
