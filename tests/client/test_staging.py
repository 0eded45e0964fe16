"""StagingPool: capture's host buffers come back for the next take of a size alike, within the pool's bound."""

import torch

from hcache.client.staging import StagingPool


def test_a_given_back_buffer_serves_the_next_take_of_its_size_class() -> None:
    pool = StagingPool(keep_bytes=1 << 24)
    taken: list[torch.Tensor] = []
    a = pool.take((3, 30_000), torch.bfloat16, taken)
    b = pool.take((5, 100_000), torch.float32, taken)
    assert a.shape == (3, 30_000) and a.dtype == torch.bfloat16 and b.shape == (5, 100_000)
    bufs = [t.data_ptr() for t in taken]
    pool.give(taken)
    assert taken == []
    again: list[torch.Tensor] = []
    c = pool.take((5, 90_000), torch.float32, again)  # smaller, same power of two: the same buffer
    d = pool.take((2, 40_000), torch.bfloat16, again)
    assert c.data_ptr() == bufs[1] and d.data_ptr() == bufs[0]
    e = pool.take((3, 30_000), torch.bfloat16, again)  # its buffer is out: a fresh one
    assert e.data_ptr() not in bufs


def test_small_takes_are_plain_tensors_outside_the_pool() -> None:
    pool = StagingPool(keep_bytes=1 << 24)
    taken: list[torch.Tensor] = []
    with torch.inference_mode():
        small = pool.take((32, 64), torch.bfloat16, taken)
    assert taken == [] and small.shape == (32, 64)
    small.add_(1)  # usable outside inference mode too


def test_buffers_beyond_the_bound_are_not_kept_nor_rounded_up() -> None:
    pool = StagingPool(keep_bytes=1 << 20)
    taken: list[torch.Tensor] = []
    big = pool.take((3 << 20,), torch.uint8, taken)
    assert taken[0].numel() == 3 << 20  # above the bound: exactly its size
    small = [pool.take((600_000,), torch.uint8, taken) for _ in range(2)]  # 1 MiB each
    ptrs = [t.data_ptr() for t in (big, *small)]
    pool.give(taken)
    again: list[torch.Tensor] = []
    assert pool.take((3 << 20,), torch.uint8, again).data_ptr() != ptrs[0]
    kept = {pool.take((600_000,), torch.uint8, again).data_ptr() for _ in range(2)}
    assert len(kept & set(ptrs[1:])) == 1  # room for one of the two
