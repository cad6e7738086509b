"""Overlapping windows over a long token sequence, and which window sees a token best."""

from __future__ import annotations

import bisect

WINDOWS_AT_ONCE = 4_096  # windows run together in evaluation and predict, each reduced to its answer before the next


def spans(length: int, size: int, step: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most `size` covering range(length), starts `step` apart."""
    if length <= size:
        return [(0, length)]
    out = []
    start = 0
    while True:
        end = min(start + size, length)
        out.append((start, end))
        if end == length:
            return out
        start += step


def best_window(position: int, windows: list[tuple[int, int]]) -> int:
    """Index of the window where `position` has the most context on its shorter side
    (the 'max context' rule of the original BERT), ties to the earlier window. The windows are
    those of `spans` (starts and ends in order): the few that hold `position` are found by bisection,
    so a long document's thousands of windows cost no more than a short one's."""
    first = bisect.bisect_right(windows, position, key=lambda w: w[1])  # the first window ending after it
    last = bisect.bisect_right(windows, position, key=lambda w: w[0])  # past the last starting at or before it
    best, score = -1, -1.0
    for i in range(first, last):
        start, end = windows[i]
        s = min(position - start, end - 1 - position) + 0.01 * (end - start)
        if s > score:
            best, score = i, s
    return best
