"""The longest prompt that fits: a search over plan()'s verdict, for ``chunkinfer plan`` and ``chunkinfer demo``."""
from __future__ import annotations

from collections.abc import Callable

from .plan import plan

SEARCH_LIMIT = 1 << 30   # tokens: the search's ceiling (a billion-token prompt is past any memory here)


def longest_that_fits(fits: Callable[[int], bool], limit: int = SEARCH_LIMIT) -> int:
    """The largest n in [1, limit] with fits(n), for a fits() that holds up to some length and not after;
    0 when not even one token fits. About 2 log2(n) calls."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):   # doubling until it stops fitting
        lo, hi = hi, hi * 2
    if hi > limit:
        if fits(limit):
            return limit
        hi = limit
    while hi - lo > 1:                # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def longest_planned(config, *, kv_compression_ratio: float | None = None, **plan_kwargs) -> int:
    """The longest ``seq_len`` whose plan(config, seq_len, **plan_kwargs) fits (0: none).

    ``kv_compression_ratio``: plan()'s, named here so the longest length with KV offload and host KV
    compressed at that (already margined) ratio is a search of its own; None: host KV raw."""
    return longest_that_fits(
        lambda n: plan(config, n, kv_compression_ratio=kv_compression_ratio, **plan_kwargs).fits)
