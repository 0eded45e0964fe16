"""The arena allocator: page-rounded first-fit extents with a coalescing free list over a shared file."""

import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hcache.daemon.arena import PAGE, Arena

PAGES = 64


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    a = Arena(PAGES * PAGE, tmp_path)
    yield a
    a.close()


def free_gaps(live: dict[int, int], size: int) -> list[int]:
    """Lengths of the holes between live extents (offset -> rounded length)."""
    gaps, pos = [], 0
    for off in sorted(live):
        gaps.append(off - pos)
        pos = off + live[off]
    gaps.append(size - pos)
    return [g for g in gaps if g > 0]


def test_size_is_whole_pages_and_the_file_is_private(tmp_path):
    a = Arena(10 * PAGE + 100, tmp_path)
    try:
        assert a.size == 10 * PAGE and a.used == 0
        assert a.path.parent == tmp_path and a.path.name.startswith("hcache-arena-")
        st = os.stat(a.path)
        assert st.st_size == a.size
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        a.close()


def test_the_view_is_the_shared_file(arena):
    """Clients map the same file: bytes written through the view are in the file."""
    off = arena.alloc(3 * PAGE)
    arena.view[off + 5 : off + 10] = b"hello"
    with open(arena.path, "rb") as f:
        f.seek(off + 5)
        assert f.read(5) == b"hello"


def test_alloc_rounds_to_pages_first_fit(arena):
    assert arena.alloc(1) == 0
    assert arena.alloc(PAGE + 1) == PAGE  # two pages
    assert arena.alloc(PAGE) == 3 * PAGE
    assert arena.used == 4 * PAGE
    arena.free(PAGE, PAGE + 1)  # frees both pages it was given
    assert arena.used == 2 * PAGE
    assert arena.alloc(PAGE) == PAGE  # the first hole that fits
    assert arena.alloc(PAGE) == 2 * PAGE
    assert arena.alloc(PAGE) == 4 * PAGE


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
def test_freed_neighbours_coalesce_in_any_order(arena, order):
    offs = [arena.alloc(PAGE) for _ in range(4)]  # the 4th stays: the 3 freed ones end before it
    for i in order:
        arena.free(offs[i], PAGE)
    assert arena.alloc(3 * PAGE) == 0  # one hole of three pages again
    arena.free(0, 3 * PAGE)
    arena.free(offs[3], PAGE)
    assert arena.used == 0
    assert arena.alloc(PAGES * PAGE) == 0  # and everything coalesced back into a single extent


def test_a_hole_coalesces_with_the_free_tail(arena):
    a = arena.alloc(PAGE)
    b = arena.alloc(PAGE)
    arena.free(b, PAGE)  # merges into the free tail
    assert arena.alloc((PAGES - 1) * PAGE) == b
    assert arena.alloc(1) is None
    arena.free(a, PAGE)
    assert arena.alloc(PAGE) == a


def test_exhaustion_returns_none_and_changes_nothing(arena):
    assert arena.alloc(PAGES * PAGE + 1) is None
    assert arena.used == 0
    whole = arena.alloc(PAGES * PAGE)
    assert whole == 0 and arena.used == PAGES * PAGE
    assert arena.alloc(1) is None
    assert arena.used == PAGES * PAGE
    arena.free(0, PAGES * PAGE)
    # fragmented: 32 one-page holes, no two adjacent, cannot give two pages
    offs = [arena.alloc(PAGE) for _ in range(PAGES)]
    for off in offs[::2]:
        arena.free(off, PAGE)
    assert arena.used == PAGES * PAGE // 2
    assert arena.alloc(2 * PAGE) is None
    assert arena.used == PAGES * PAGE // 2
    assert arena.alloc(PAGE) == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_alloc_free_never_overlaps_and_counts_used(tmp_path, seed):
    rng = random.Random(seed)
    size = 256 * PAGE
    a = Arena(size, tmp_path)
    live: dict[int, int] = {}  # offset -> length handed out (rounded)
    asked: dict[int, int] = {}  # offset -> bytes asked for (what free() is given back)
    try:
        for _ in range(3000):
            if live and (rng.random() < 0.45 or a.used > size * 0.9):
                off = rng.choice(list(live))
                a.free(off, asked.pop(off))
                del live[off]
            else:
                nbytes = rng.choice([rng.randint(1, PAGE), rng.randint(1, 8) * PAGE, rng.randint(1, 20 * PAGE)])
                n = -(-nbytes // PAGE) * PAGE
                off = a.alloc(nbytes)
                if off is None:
                    assert max(free_gaps(live, size), default=0) < n, "a hole large enough was not found"
                    continue
                assert off % PAGE == 0 and 0 <= off and off + n <= size
                for o, length in live.items():
                    assert off + n <= o or o + length <= off, f"[{off}, {off + n}) overlaps [{o}, {o + length})"
                # first fit: no hole before it was large enough
                assert all(g < n for g in free_gaps({o: x for o, x in live.items() if o < off}, off)), "not first fit"
                live[off] = n
                asked[off] = nbytes
            assert a.used == sum(live.values())
        for off in list(live):
            a.free(off, asked.pop(off))
        assert a.used == 0
        assert a.alloc(size) == 0  # all of it coalesced again
    finally:
        a.close()


def test_close_unlinks_the_file(tmp_path):
    a = Arena(4 * PAGE, tmp_path)
    path = a.path
    assert path.exists()
    off = a.alloc(PAGE)
    a.view[off : off + 4] = b"data"
    a.close()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_close_with_a_view_still_exported(tmp_path):
    """An IO buffer may still refer to the map at shutdown: close still removes the file and does not raise."""
    a = Arena(4 * PAGE, tmp_path)
    held = a.view[0:PAGE]
    a.close()
    assert not a.path.exists()
    held.release()


def test_two_arenas_in_one_directory_do_not_collide(tmp_path):
    a, b = Arena(4 * PAGE, tmp_path), Arena(4 * PAGE, tmp_path)
    try:
        assert a.path != b.path
        a.view[0:3] = b"aaa"
        assert bytes(b.view[0:3]) == b"\0\0\0"
    finally:
        a.close()
        b.close()


def test_a_umask_that_shares_with_the_group_makes_the_arena_group_writable(tmp_path):
    """Under the unit's UMask=0007, clients in hcached's group map the arena as they reach the socket."""
    old = os.umask(0o007)
    try:
        a = Arena(4 * PAGE, tmp_path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(a.path).st_mode) == 0o660
    finally:
        a.close()
