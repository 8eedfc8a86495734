"""Side-by-side timings that give the same answer twice: variants interleaved, repeated, summarised by median.

Run one variant after the other and a change in the machine's load (another process, a
thermal step, the page cache) lands on one variant only: the same command printed engine/bare
0.83 and then 1.04 minutes apart. Here every repeat runs each variant once, in an order rotated
by one per repeat, and a ratio is taken within each repeat (variants measured seconds apart),
then summarised by its median and its lowest and highest values over the repeats.
"""

from __future__ import annotations

import statistics
from typing import Callable, Mapping, Sequence


def interleaved(variants: Mapping[str, Callable[[], float]], repeats: int,
                progress: Callable[[str], None] = lambda _: None) -> dict[str, list[float]]:
    """{variant: [one measurement per repeat]}; repeat r runs the variants rotated by r."""
    names = list(variants)
    results: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            results[name].append(variants[name]())
            progress(f"repeat {repeat + 1}/{repeats}: {name} {results[name][-1]:.3g}")
    return results


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-repeat ratios (each from measurements taken within the same repeat)."""
    return [a / b for a, b in zip(numerator, denominator)]


def summary(values: Sequence[float], digits: int = 2) -> str:
    """'median [lowest, highest]' (the spread is what a single run could have printed)."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"
