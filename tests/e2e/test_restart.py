"""A serving process outlives hcached: its client goes on in the new daemon's arena, and an append that would land
at the wrong place (tokens lost with a restart, or another writer) is refused, never stored."""

import os
import time

import pytest
import torch

from hcache.client import ContextChanged, DaemonUnreachable, HCacheClient, HCacheError
from hcache.layout import wire
from tests.e2e.data import GQA, MHA, Expected, assert_restores, geometry
from tests.e2e.test_durability import _save
from tests.e2e.test_tcp import free_port


def _restart(daemon, how: str) -> None:
    if how == "sigterm":
        assert daemon.stop() == 0
    else:
        daemon.kill()
    daemon.start()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_client_goes_on_in_the_arena_of_a_restarted_hcached(daemon, how):
    gen = torch.Generator().manual_seed(21)
    exp = Expected(geometry(MHA, "bfloat16"))
    with HCacheClient(daemon.socket) as c:
        _save(c, exp, gen, [130])
        c.flush("chat")
        before = c._aio._arena.path
        _restart(daemon, how)
        assert_restores(c, "chat", exp)  # read through the new daemon's arena, not the old mapping
        assert c._aio._arena.path != before
        c.append("chat", *exp.round(70, gen))  # written where the new daemon reads it
        assert_restores(c, "chat", exp)
    with HCacheClient(daemon.socket) as fresh:
        assert_restores(fresh, "chat", exp)


def test_an_append_after_tokens_were_lost_is_refused_and_stores_nothing(daemon):
    gen = torch.Generator().manual_seed(22)
    exp = Expected(geometry(GQA, "float32"))
    with HCacheClient(daemon.socket) as c:
        _save(c, exp, gen, [100])
        c.flush("chat")
        c.append("chat", *exp.round(30, gen))  # committed, not durable: gone with a kill -9
        _restart(daemon, "sigkill")
        with pytest.raises(ContextChanged, match="holds 100 durable tokens, this client saw it hold 130"):
            c.flush("chat")  # "durable" would be a lie
        lost = exp.round(50, gen)
        with pytest.raises(ContextChanged, match="holds 100 tokens, the append continues from 130"):
            c.append("chat", *lost)
        assert_restores(c, "chat", exp, n_tokens=100)
        assert c.stat("chat").n_tokens == 100  # seen afresh: appends go on from there


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_an_append_from_a_length_another_client_changed_is_refused(daemon_factory, transport):
    port = free_port()
    d = daemon_factory(extra=["--tcp", f"127.0.0.1:{port}"])
    endpoint = d.socket if transport == "ipc" else f"tcp://127.0.0.1:{port}"
    gen = torch.Generator().manual_seed(23)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(endpoint) as a, HCacheClient(endpoint) as b:
        a.open("chat", model="tiny", geometry=exp.geometry, layers=exp.layers)
        a.append("chat", *exp.round(40, gen))
        b.append("chat", *exp.round(20, gen))  # b looks the context up: 40 tokens, appends from there
        with pytest.raises(ContextChanged, match="holds 60 tokens, the append continues from 40"):
            a.append("chat", *Expected(exp.geometry).round(10, gen))
        assert_restores(a, "chat", exp)


def test_a_lease_for_another_arena_is_refused_before_it_takes_effect(daemon):
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(daemon.socket) as c:
        c.open("chat", model="tiny", geometry=exp.geometry, layers=exp.layers)
    reply = daemon.request({"v": wire.PROTOCOL_VERSION, "op": "append", "id": 7, "ctx": "chat", "n": 5,
                            "arena": "/dev/shm/hcache-arena-1-gone"})
    assert reply["error"] == wire.RESTARTED and "earlier hcached" in reply["message"]
    assert daemon.request({"v": wire.PROTOCOL_VERSION, "op": "status", "id": 8})["leases"] == 0


def test_a_call_waiting_when_hcached_dies_fails_at_once_and_the_next_one_reaches_it_again(daemon_factory):
    d = daemon_factory(extra=["--read-throttle", str(1 << 20)])  # 1 MiB/s: a 4 MiB read waits seconds
    gen = torch.Generator().manual_seed(24)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(d.socket, timeout=300) as c:
        c.open("chat", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("chat", *exp.round(2048, gen))
        c.flush("chat", drop=True)  # restores read the disk
        reading = c.restore_future("chat", "hidden")
        time.sleep(0.5)
        start = time.monotonic()
        d.kill()
        with pytest.raises(DaemonUnreachable, match="went away while this call waited"):
            reading.result(timeout=60)
        assert time.monotonic() - start < 30  # not the call's 300 s timeout
        d.start()
        assert c.stat("chat").n_tokens == 2048


def test_calls_while_hcached_is_down_fail_within_the_connect_timeout(daemon):
    with HCacheClient(daemon.socket, timeout=300, connect_timeout=2) as c:
        c.status()
        assert daemon.stop() == 0  # and it stays down
        start = time.monotonic()
        with pytest.raises(DaemonUnreachable, match="not reachable"):
            c.status()
        assert time.monotonic() - start < 30  # not the call's 300 s timeout
        daemon.start()
        assert c.status()["leases"] == 0  # reconnected by itself


def test_a_client_used_after_a_fork_says_so_instead_of_hanging(daemon):
    with HCacheClient(daemon.socket) as c:
        c.status()
        pid = os.fork()
        if pid == 0:  # the child: the client's loop thread stayed in the parent
            try:
                c.status()
                code = 1
            except HCacheError as e:
                code = 0 if "before a fork" in str(e) else 2
            except BaseException:
                code = 3
            os._exit(code)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                pytest.fail("the forked child's call hung")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert c.status()["leases"] == 0  # the parent's client goes on
