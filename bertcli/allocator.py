"""Keep freed memory in the process instead of handing it back to the kernel (glibc malloc).

PyTorch's CPU tensors come from malloc. By default glibc serves blocks over its mmap threshold
(128 KB at first, raised as mapped blocks are freed, at most 32 MB) with a fresh mmap and unmaps
them on free, and trims the heap whenever more than twice that threshold is free at its top. A
training step frees and allocates again nearly all of its activations, gradients and bf16 weight
copies, so each step page-faulted them back in: ~120,000 minor faults per BERT-base step (batch
8, bf16), ~5 us each on this VM. Blocks over 32 MB are mapped whatever the threshold: the MLM
logits of a batch-32 step (~440 masked positions x 30,522 words in fp32, 54 MB) are one.

The policy here turns mmap and trimming off: every block comes from the heap and returns to it,
so once the heap has grown to the step's needs, blocks are reused without faults. That holds
only if the heap settles. Blocks that outlive a step leave holes that the next step's
activations split, so the heap keeps growing: the model keeps its largest such block, the word
embeddings' gradient, allocated across steps instead (fastpath.py: grad_buffer), and rounds its
matmul row counts so that oneDNN's per-shape kernel cache stops churning (fastpath.py: rounded).

What is freed stays with the process, so resident memory sits at the heap's high-water mark.
Over 120 BERT-base steps (batch 8, WikiText batches of varying length) the heap settled by
step 60 at 3.2 GB, for 1.7 GB in use, and resident memory peaked at 3.4 GB; before the row
counts were rounded it was still growing at step 120 (4.5 GB heap, 4.7 GB resident). Set
BERTCLI_KEEP_FREED_MEMORY=0 to keep glibc's defaults. Does nothing where malloc is not glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and never trim it. Returns whether it
    applied (False on other C libraries, or when BERTCLI_KEEP_FREED_MEMORY=0)."""
    if os.environ.get("BERTCLI_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
