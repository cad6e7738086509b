"""keep_freed_memory: a freed large tensor's memory is reused without page faults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy is glibc malloc's")

# 64 MB is above glibc's largest mmap threshold (32 MB): by default every such block is a fresh
# mapping whose 16,384 pages fault in when written.
PROBE = """
import resource, torch
from bertcli.allocator import keep_freed_memory
applied = keep_freed_memory()
for _ in range(8):  # the heap grows a few times before freed blocks fit (posix_memalign leaves gaps)
    torch.ones(16 * 2**20)  # 64 MB, allocated, written and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(16 * 2**20)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(env_value: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "BERTCLI_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["BERTCLI_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


def test_freed_memory_is_reused_without_page_faults():
    applied, faults = probe(None)
    assert applied
    assert faults < 1000  # 3 x 16,384 pages would fault without the policy


def test_opt_out_keeps_glibc_defaults():
    applied, faults = probe("0")
    assert not applied
    assert faults > 3 * 15000
