"""Remote clients: hcached also listening on tcp; the data moves in ZeroMQ payload frames, not the arena."""

import socket

import pytest
import torch

from hcache.client import BadRequest, HCacheClient, UnknownContext
from tests.e2e.data import GQA, MHA, Expected, assert_restores, geometry


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("shape", "dtype"), [(GQA, "bfloat16"), (MHA, "float32")], ids=["gqa-bf16", "mha-fp32"])
def test_two_rounds_round_trip_bit_exact_over_tcp(daemon_factory, shape, dtype):
    port = free_port()
    d = daemon_factory(extra=["--tcp", f"127.0.0.1:{port}"])
    gen = torch.Generator().manual_seed(13)
    exp = Expected(geometry(shape, dtype))
    with HCacheClient(f"tcp://127.0.0.1:{port}") as c:
        assert c._aio.local is False  # no shared arena: payload frames
        assert c._aio._arena is None
        status = c.status()
        assert status["tcp"] == f"127.0.0.1:{port}"
        c.open("remote", model="tiny", geometry=exp.geometry, layers=exp.layers)
        for n in (100, 93):  # round 2 starts inside chunk 1 and ends inside chunk 3
            assert c.append("remote", *exp.round(n, gen)) == exp.n_tokens
            assert_restores(c, "remote", exp)
        got = c.restore("remote", "hidden", layers=[1], start=60, end=130)
        assert torch.equal(got[0].view(torch.uint8), exp.all("hidden")[1, 60:130].contiguous().view(torch.uint8))
        c.flush("remote")
        assert c.stat("remote").durable_tokens == exp.n_tokens
        assert c.status()["leases"] == 0  # inline appends and reads hold no lease between calls
    # the same context, seen by a local (ipc) client, holds the same bytes
    with HCacheClient(d.socket) as local:
        assert local._aio.local is True
        assert_restores(local, "remote", exp)


def test_errors_come_back_over_tcp(daemon_factory):
    port = free_port()
    daemon_factory(extra=["--tcp", f"127.0.0.1:{port}"])
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(f"tcp://127.0.0.1:{port}") as c:
        with pytest.raises(UnknownContext, match="'nothing-here'"):
            c.stat("nothing-here")
        c.open("e", model="tiny", geometry=exp.geometry, layers=exp.layers)
        with pytest.raises(BadRequest, match="outside context"):
            c.restore("e", "hidden", start=0, end=5)
        c.append("e", *exp.round(5, torch.Generator().manual_seed(1)))
        assert_restores(c, "e", exp)
