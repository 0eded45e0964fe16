"""Leases do not outlive their clients: a client process that dies, or that never commits, does not block a
context for long, and released read leases leave nothing open."""

import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

from hcache.client import Busy, HCacheClient
from hcache.daemon.process import DaemonProcess
from hcache.layout import wire
from hcache.layout.geometry import Rep
from tests.e2e.data import MHA, Expected, assert_restores, geometry
from tests.e2e.raw import Raw

V = wire.PROTOCOL_VERSION

# A client process speaking the raw protocol: hello with its pid, then one request given as JSON on argv;
# prints the reply, then waits for its stdin to close and exits without committing or releasing anything.
CHILD = r"""
import json, os, sys
import zmq
from hcache.layout import wire

sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])

def call(**fields):
    sock.send(wire.encode({"v": wire.PROTOCOL_VERSION, "id": 1, **fields}))
    assert sock.poll(10_000), f"no reply to {fields['op']}"
    return wire.decode(sock.recv_multipart()[0])

assert call(op="hello", pid=os.getpid())["ok"]
for request in json.loads(sys.argv[2]):
    print(json.dumps(call(**request)), flush=True)
sys.stdin.read()
os._exit(0)
"""


def start_child(d: DaemonProcess, requests: list[dict]) -> tuple[subprocess.Popen, list[dict]]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, f"ipc://{d.socket}", json.dumps(requests)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    replies = []
    for _ in requests:
        line = child.stdout.readline()
        assert line, f"the child client died early (rc {child.wait()})"
        replies.append(json.loads(line))
    return child, replies


def end_child(child: subprocess.Popen) -> None:
    """Let the child exit and reap it (a zombie's pid still answers kill(pid, 0))."""
    child.stdin.close()
    assert child.wait(10) == 0
    child.stdout.close()


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll check() until it holds; returns the seconds it took."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - t0


def leases(c: HCacheClient) -> int:
    return c.status()["leases"]


def test_a_client_that_dies_holding_an_append_lease_does_not_block_the_context(daemon_factory):
    # leases last 60 s here: only noticing the dead process can free the context within seconds
    d = daemon_factory(extra=["--lease-timeout", "60"])
    gen = torch.Generator().manual_seed(21)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(d.socket) as c:
        c.open("chat", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("chat", *exp.round(40, gen))
        child, (reply,) = start_child(d, [{"op": "append", "ctx": "chat", "n": 100}])
        try:
            assert reply["ok"] and (reply["start"], reply["end"]) == (40, 140), reply
            ids, data = exp.round(30, gen)
            with pytest.raises(Busy, match="append in progress"):
                c.append("chat", ids, data)  # the child's lease holds the context while it lives
            assert leases(c) == 1
        finally:
            end_child(child)
        took = wait_until("the dead client's lease is taken back", lambda: leases(c) == 0, 5.0)
        assert took < 5.0
        assert c.append("chat", ids, data) == 70  # the dead client's 100 tokens were never committed
        assert_restores(c, "chat", exp)
        c.flush("chat")
    d.restart()
    with HCacheClient(d.socket) as c:
        assert_restores(c, "chat", exp)


def test_a_client_that_dies_holding_read_leases_releases_them(daemon_factory):
    d = daemon_factory(extra=["--lease-timeout", "60"])
    gen = torch.Generator().manual_seed(22)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(d.socket) as c:
        c.open("r", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("r", *exp.round(150, gen))
        c.flush("r")  # nothing dirty or flushing: after a delete, only pins could keep chunks in the arena
        streams = [[0, int(Rep.HIDDEN)], [2, int(Rep.KV)]]
        reads = [{"op": "read", "ctx": "r", "streams": streams, "start": s, "end": e} for s, e in ((0, 64), (10, 150))]
        child, replies = start_child(d, reads)
        try:
            assert all(r["ok"] for r in replies), replies
            assert leases(c) == 2
        finally:
            end_child(child)
        wait_until("the dead reader's leases are taken back", lambda: leases(c) == 0, 5.0)
        c.delete("r")
        assert c.list() == []
        assert c.status()["arena"]["used"] == 0  # none of its chunks is still pinned


def test_a_lease_not_committed_in_time_expires(daemon_factory):
    d = daemon_factory(extra=["--lease-timeout", "1"])  # the last --lease-timeout wins over the harness's 10
    a, b = Raw(d), Raw(d)
    try:
        geom = geometry(MHA, "float32").to_dict()
        assert a.call("open", ctx="slow", model="tiny", geometry=geom)["ok"]
        lease = a.call("append", ctx="slow", n=10)
        assert lease["ok"]
        assert b.call("append", ctx="slow", n=5)["error"] == wire.BUSY
        t0 = time.monotonic()
        mine: dict = {}

        def b_gets_a_lease() -> bool:
            mine.update(b.call("append", ctx="slow", n=5))
            assert mine["ok"] or mine["error"] == wire.BUSY, mine
            return mine["ok"]

        wait_until("the uncommitted lease expires", b_gets_a_lease, 5.0)
        assert time.monotonic() - t0 > 0.5  # it was the 1 s timeout, not something at once
        late = a.call("commit", lease=lease["lease"])
        assert late["ok"] is False and late["error"] == wire.BAD_LEASE, late
        assert b.call("commit", lease=mine["lease"])["n_tokens"] == 5  # the expired lease's 10 never counted
        # read leases expire too
        read = a.call("read", ctx="slow", streams=[[0, int(Rep.HIDDEN)]], start=0, end=5)
        assert read["ok"]
        wait_until("the read lease expires", lambda: a.call("status")["leases"] == 0, 5.0)
        late = a.call("release", lease=read["lease"])
        assert late["ok"] is False and late["error"] == wire.BAD_LEASE
    finally:
        a.close()
        b.close()


def test_read_leases_are_released_when_a_client_is_done(daemon_factory):
    d = daemon_factory(extra=["--lease-timeout", "60"])
    gen = torch.Generator().manual_seed(23)
    exp = Expected(geometry(MHA, "bfloat16"))
    with HCacheClient(d.socket) as writer:
        writer.open("s", model="tiny", geometry=exp.geometry, layers=exp.layers)
        writer.append("s", *exp.round(200, gen))
        writer.flush("s")
        for _ in range(2):
            with HCacheClient(d.socket) as reader:
                assert_restores(reader, "s", exp)
                reader.restore("s", "kv", layers=[2], start=63, end=65)
            assert leases(writer) == 0
        d.restart()  # and from disk
        with HCacheClient(d.socket) as reader:
            assert_restores(reader, "s", exp)
            assert reader.status()["disk_reads"] > 0
            assert leases(reader) == 0


def test_a_dead_client_not_yet_reaped_by_its_parent_releases_its_lease(daemon_factory):
    d = daemon_factory(extra=["--lease-timeout", "60"])
    with HCacheClient(d.socket) as c:
        c.open("z", model="tiny", geometry=geometry(MHA, "float32"))
        child, (reply,) = start_child(d, [{"op": "append", "ctx": "z", "n": 10}])
        try:
            assert reply["ok"]
            child.stdin.close()
            wait_until("the child exits", lambda: _is_zombie(child.pid), 5.0)
            wait_until("the exited client's lease is taken back", lambda: leases(c) == 0, 2.5)
        finally:
            child.wait(10)
            child.stdout.close()


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"
