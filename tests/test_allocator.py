"""keep_freed_memory: blocks of every size come from the heap and go back to it, instead of
being mapped afresh and unmapped when freed."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy is glibc malloc's")

# glibc's mallinfo2().hblkhd counts the bytes in mapped blocks. By default a block over 128 KB is
# mapped (until freed mapped blocks raise that threshold, at most to 32 MB); under the policy none
# is.
PROBE = """
import ctypes, torch
from bertcli.allocator import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
def mapped(megabytes):
    before = libc.mallinfo2().hblkhd
    block = torch.ones(megabytes * 2**18)  # fp32
    return libc.mallinfo2().hblkhd - before
print(applied, mapped(1), mapped(20), mapped(40))
"""


def probe(env_value: str | None) -> tuple[bool, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "BERTCLI_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["BERTCLI_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    applied, *sizes = out.stdout.split()
    return applied == "True", [int(s) for s in sizes]


def test_blocks_of_every_size_come_from_the_heap():
    applied, (one, twenty, forty) = probe(None)
    assert applied
    assert one == twenty == forty == 0


def test_opt_out_keeps_glibc_defaults():
    applied, (one, twenty, forty) = probe("0")
    assert not applied
    assert one >= 2**20  # the first block over 128 KB is mapped
    assert forty >= 40 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("keep", [True, False])
def test_the_policy_is_the_command_s_choice_not_the_library_s(keep, tmp_path, tiny_tokenizer_dir):
    """`bertcli finetune` asks for it (keep_memory=True); a program calling jobs.finetune keeps glibc's defaults."""
    from conftest import REVIEWS, write_recipe

    (tmp_path / "train.tsv").write_text(REVIEWS)
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv"),
                          "max_seq_len": 16}, {"max_steps": 1}, tokenizer=tiny_tokenizer_dir)
    code = PROBE.replace("applied = keep_freed_memory()", (
        "from bertcli.jobs import finetune\nfrom bertcli.recipes import load_recipe\n"
        f"finetune(load_recipe({str(recipe)!r}), __import__('pathlib').Path({str(tmp_path / 'run')!r}), False, False, "
        f"keep_memory={keep})\napplied = None"))
    env = {k: v for k, v in os.environ.items() if k != "BERTCLI_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    assert out.returncode == 0, out.stderr[-2000:]
    forty = int(out.stdout.split()[-1])
    assert (forty == 0) if keep else (forty >= 40 * 2**20)
