"""How evaluation work is split across ranks: contiguous shards, as the reference's InferenceSampler."""

from __future__ import annotations


def shard_range(total: int, rank: int, world_size: int) -> range:
    """The contiguous slice of ``range(total)`` that ``rank`` handles; earlier ranks take one extra item when
    ``world_size`` does not divide ``total``, so sizes differ by at most one and gathering in rank order restores
    the original order."""
    base, extra = divmod(total, world_size)
    begin = rank * base + min(rank, extra)
    return range(begin, begin + base + int(rank < extra))
