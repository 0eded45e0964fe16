"""Bad requests against the real hcached: each gets an error reply that names what was wrong, and the
daemon keeps serving (a hello answers after every one, and a normal client round trip works at the end)."""

import itertools
import resource
import time
from collections.abc import Iterator

import msgpack
import pytest
import torch
import zmq

from hcache.client import HCacheClient, LeaseError
from hcache.daemon.process import DaemonProcess
from hcache.layout import wire
from hcache.layout.geometry import Geometry, Rep
from hcache.layout.wire import BAD_LEASE, BAD_REQUEST, BUSY, MODEL_MISMATCH, OVER_CAPACITY, UNKNOWN_CONTEXT
from tests.e2e.data import GQA, Expected, assert_restores, geometry
from tests.e2e.raw import Raw

V = wire.PROTOCOL_VERSION
GEOM = Geometry(num_layers=2, hidden_size=64, num_kv_heads=2, head_dim=16, dtype="float32")
LAYERS = {"hidden": [0, 1], "kv": [1]}
# the streams of a context opened with LAYERS: hidden 0, hidden 1, kv 1, then the token records
STREAM_BYTES = [GEOM.token_bytes(Rep.HIDDEN)] * 2 + [GEOM.token_bytes(Rep.KV), GEOM.token_bytes(Rep.TOKENS)]


@pytest.fixture(scope="module")
def hcached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the whole module: every test's bad requests go to the same process."""
    d = DaemonProcess(tmp_path_factory.mktemp("malformed")).start()
    yield d
    alive = d.proc is not None and d.proc.poll() is None
    d.cleanup()
    assert alive, f"hcached died during the malformed-request tests:\n{d.log()[-4000:]}"


@pytest.fixture
def raw(hcached: DaemonProcess) -> Iterator[Raw]:
    r = Raw(hcached)
    yield r
    r.close()


_names = itertools.count()


def new_ctx(d: DaemonProcess, n_tokens: int = 0, **open_fields: object) -> str:
    """Open a fresh context (GEOM, LAYERS) and append n_tokens of zeros inline."""
    name = f"ctx{next(_names)}"
    reply = d.request({"v": V, "op": "open", "id": 1, "ctx": name, "model": "m", "geometry": GEOM.to_dict(),
                       "layers": LAYERS, **open_fields})
    assert reply is not None and reply["ok"], reply
    if n_tokens:
        reply = d.request({"v": V, "op": "append", "id": 1, "ctx": name, "n": n_tokens, "inline": True},
                          frames=[bytes(b * n_tokens) for b in STREAM_BYTES])
        assert reply is not None and reply["ok"] and reply["n_tokens"] == n_tokens, reply
    return name


def assert_still_serves(d: DaemonProcess) -> None:
    assert d.proc is not None and d.proc.poll() is None, f"hcached exited:\n{d.log()[-4000:]}"
    reply = d.request({"v": V, "op": "hello", "id": 9}, timeout_ms=5000)
    assert reply is not None and reply["ok"] and reply["id"] == 9, "hcached stopped answering hello"


def assert_refused(d: DaemonProcess, reply: dict | None, code: str, *words: str) -> None:
    """An error reply with this code whose message names every one of `words`; the daemon still answers."""
    assert reply is not None, "no reply: the request hung or killed the daemon"
    assert reply["ok"] is False, reply
    assert reply["error"] == code, reply
    message = reply["message"]
    assert isinstance(message, str)
    for w in words:
        assert w in message, f"{w!r} not in the error message {message!r}"
    assert_still_serves(d)


def n_tokens(d: DaemonProcess, ctx: str) -> int:
    reply = d.request({"v": V, "op": "stat", "id": 1, "ctx": ctx})
    assert reply is not None and reply["ok"], reply
    return reply["n_tokens"]


# -- the header frame ------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw_header", "words"), [
    (b"\xc1garbage\xff\x00", ["not valid msgpack"]),
    (b"", ["not valid msgpack"]),  # an empty body frame
    (msgpack.packb({"v": V, "op": "hello"})[:-3], ["not valid msgpack"]),  # truncated
    (msgpack.packb([V, "hello", 1]), ["msgpack map", "list"]),
    (msgpack.packb(7), ["msgpack map", "int"]),
    (msgpack.packb("hello"), ["msgpack map", "str"]),
    (msgpack.packb({1: "hello"}), ["not valid msgpack"]),  # map keys must be strings
], ids=["garbage", "empty", "truncated", "list", "int", "str", "int-keys"])
def test_header_that_is_not_a_request_map(hcached, raw_header, words):
    reply = hcached.request(raw_header)
    assert_refused(hcached, reply, BAD_REQUEST, *words)
    assert reply["id"] is None  # nothing to match it to
    assert reply["v"] == V


@pytest.mark.parametrize(("header", "words"), [
    ({"v": V, "id": 3}, ["missing field 'op'"]),
    ({"v": V, "op": 5, "id": 3}, ["'op'", "str"]),
    ({"v": V + 1, "op": "hello", "id": 3}, ["protocol version", str(V + 1), "upgrade"]),
    ({"op": "hello", "id": 3}, ["protocol version None"]),
    ({"v": "1", "op": "hello", "id": 3}, ["protocol version '1'"]),
    ({"v": V, "op": "frobnicate", "id": 3}, ["unknown op 'frobnicate'", "hello"]),
    ({"v": V, "op": "op_hello", "id": 3}, ["unknown op 'op_hello'"]),
], ids=["no-op", "op-int", "newer-version", "no-version", "version-str", "unknown-op", "method-name"])
def test_request_map_without_a_valid_op(hcached, header, words):
    reply = hcached.request(header)
    assert_refused(hcached, reply, BAD_REQUEST, *words)
    assert reply["id"] == 3  # the caller's call id comes back so it can match the error


def test_empty_multipart_body_after_a_req_delimiter(hcached):
    """[b"", b""]: a REQ-style empty delimiter followed by an empty header frame."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(f"ipc://{hcached.socket}")
        s.send_multipart([b"", b""])
        assert s.poll(5000), "no reply to an empty request"
        frames = s.recv_multipart()
    finally:
        s.close()
    assert frames[0] == b""  # the delimiter is echoed for REQ clients
    assert_refused(hcached, wire.decode(frames[1]), BAD_REQUEST, "msgpack")


# -- fields of the wrong type ----------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "words"), [
    ({"op": "stat", "ctx": 5}, ["'ctx'", "str", "int"]),
    ({"op": "stat", "ns": ["a"], "ctx": "{ctx}"}, ["'ns'", "str", "list"]),
    ({"op": "append", "ctx": "{ctx}", "n": "10"}, ["'n'", "int", "str"]),
    ({"op": "append", "ctx": "{ctx}", "n": 1.5}, ["'n'", "int", "float"]),
    ({"op": "append", "ctx": "{ctx}", "n": True}, ["'n'", "int", "bool"]),
    ({"op": "append", "ctx": "{ctx}", "n": -3}, ["'n'", ">= 0"]),
    ({"op": "append", "ctx": "{ctx}", "n": 4, "inline": "yes"}, ["'inline'", "bool"]),
    ({"op": "append", "ctx": "{ctx}"}, ["missing field 'n'"]),
    ({"op": "read", "ctx": "{ctx}", "streams": "0,1", "start": 0, "end": 4}, ["'streams'", "list", "str"]),
    ({"op": "read", "ctx": "{ctx}", "streams": {"0": 1}, "start": 0, "end": 4}, ["'streams'", "list"]),
    ({"op": "read", "ctx": "{ctx}", "streams": [], "start": 0, "end": 4}, ["non-empty"]),
    ({"op": "read", "ctx": "{ctx}", "streams": [[0]], "start": 0, "end": 4}, ["[layer, rep] pairs"]),
    ({"op": "read", "ctx": "{ctx}", "streams": [[0, "hidden"]], "start": 0, "end": 4}, ["[layer, rep] pairs"]),
    ({"op": "read", "ctx": "{ctx}", "streams": [[0, 1]], "start": -1, "end": 4}, ["'start'", ">= 0"]),
    ({"op": "read", "ctx": "{ctx}", "streams": [[0, 1]], "start": 0, "end": "4"}, ["'end'", "int"]),
    ({"op": "commit", "lease": "17"}, ["'lease'", "int", "str"]),
    ({"op": "abort", "lease": None}, ["'lease'", "int", "NoneType"]),
    ({"op": "release"}, ["missing field 'lease'"]),
    ({"op": "open", "ctx": "x", "model": 3, "geometry": GEOM.to_dict()}, ["'model'", "str"]),
    ({"op": "open", "ctx": "x", "model": "m", "geometry": GEOM.to_dict(), "create": 1}, ["'create'", "bool"]),
], ids=["stat-ctx-int", "stat-ns-list", "append-n-str", "append-n-float", "append-n-bool", "append-n-negative",
        "append-inline-str", "append-no-n", "read-streams-str", "read-streams-map", "read-streams-empty",
        "read-stream-short", "read-rep-str", "read-start-negative", "read-end-str", "commit-lease-str",
        "abort-lease-none", "release-no-lease", "open-model-int", "open-create-int"])
def test_fields_of_the_wrong_type(hcached, fields, words):
    ctx = new_ctx(hcached, n_tokens=8)
    header = {"v": V, "id": 4, **{k: ctx if v == "{ctx}" else v for k, v in fields.items()}}
    assert_refused(hcached, hcached.request(header), BAD_REQUEST, *words)
    assert n_tokens(hcached, ctx) == 8
    stat = hcached.request({"v": V, "op": "stat", "id": 1, "ctx": "x"})
    assert stat["error"] == UNKNOWN_CONTEXT  # a refused open created nothing


# -- open --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("geom", "words"), [
    ({**GEOM.to_dict(), "num_layers": -2}, ["num_layers", "1..4096", "-2"]),
    ({**GEOM.to_dict(), "num_layers": 0}, ["num_layers", "1..4096"]),
    ({**GEOM.to_dict(), "hidden_size": "64"}, ["hidden_size", "must be an integer"]),
    ({**GEOM.to_dict(), "head_dim": 16.0}, ["head_dim", "must be an integer"]),
    ({**GEOM.to_dict(), "dtype": "float13"}, ["dtype", "float13", "bfloat16"]),
    ({k: v for k, v in GEOM.to_dict().items() if k != "num_kv_heads"}, ["missing", "num_kv_heads"]),
    ([2, 64, 2, 16, "float32"], ["'geometry'", "dict", "list"]),
], ids=["negative-layers", "zero-layers", "str-hidden", "float-head-dim", "unknown-dtype", "missing-field",
        "not-a-map"])
def test_open_with_a_bad_geometry(hcached, geom, words):
    header = {"v": V, "op": "open", "id": 1, "ctx": "badgeom", "model": "m", "geometry": geom}
    assert_refused(hcached, hcached.request(header), BAD_REQUEST, *words)
    stat = hcached.request({"v": V, "op": "stat", "id": 1, "ctx": "badgeom"})
    assert stat["error"] == UNKNOWN_CONTEXT


@pytest.mark.parametrize(("layers", "words"), [
    ({"hidden": [0, 2]}, ["layers['hidden']", "outside 0..1", "2"]),
    ({"kv": [-1]}, ["layers['kv']", "outside 0..1"]),
    ({"hidden": [0, 0]}, ["layers['hidden']", "repeated"]),
    ({"plan": [0]}, ["unknown representation 'plan'"]),
    ({"hidden": "all"}, ["list of layer numbers"]),
    ({"hidden": [True]}, ["list of layer numbers"]),
    ([0, 1], ["layers must be a map"]),
], ids=["past-last", "negative", "repeated", "unknown-rep", "str", "bool", "list"])
def test_open_with_layers_out_of_range(hcached, layers, words):
    header = {"v": V, "op": "open", "id": 1, "ctx": "badlayers", "model": "m", "geometry": GEOM.to_dict(),
              "layers": layers}
    assert_refused(hcached, hcached.request(header), BAD_REQUEST, *words)
    stat = hcached.request({"v": V, "op": "stat", "id": 1, "ctx": "badlayers"})
    assert stat["error"] == UNKNOWN_CONTEXT


def test_open_with_an_absurd_number_of_layers_is_a_bad_request(hcached):
    header = {"v": V, "op": "open", "id": 1, "ctx": "huge", "model": "m",
              "geometry": {**GEOM.to_dict(), "num_layers": 2**62}, "layers": {"hidden": [0]}}
    assert_refused(hcached, hcached.request(header), BAD_REQUEST, "num_layers")


def test_open_with_another_model_or_geometry_is_a_model_mismatch(hcached):
    ctx = new_ctx(hcached, n_tokens=5)
    base = {"v": V, "op": "open", "id": 1, "ctx": ctx, "layers": LAYERS}
    reply = hcached.request({**base, "model": "other-model", "geometry": GEOM.to_dict()})
    assert_refused(hcached, reply, MODEL_MISMATCH, ctx, "'m'", "'other-model'")
    reply = hcached.request({**base, "model": "m", "geometry": {**GEOM.to_dict(), "hidden_size": 128}})
    assert_refused(hcached, reply, MODEL_MISMATCH, ctx, "hidden_size=128")
    reply = hcached.request({**base, "model": "m", "geometry": {**GEOM.to_dict(), "dtype": "bfloat16"}})
    assert_refused(hcached, reply, MODEL_MISMATCH, "bfloat16")
    # the same model and geometry reopens it, untouched
    reply = hcached.request({**base, "model": "m", "geometry": GEOM.to_dict()})
    assert reply["ok"] and reply["n_tokens"] == 5 and reply["model"] == "m"


def test_open_without_create_of_an_unknown_context(hcached):
    reply = hcached.request({"v": V, "op": "open", "id": 1, "ctx": "never-made", "model": "m",
                             "geometry": GEOM.to_dict(), "create": False})
    assert_refused(hcached, reply, UNKNOWN_CONTEXT, "never-made")
    stat = hcached.request({"v": V, "op": "stat", "id": 1, "ctx": "never-made"})
    assert stat["error"] == UNKNOWN_CONTEXT


# -- unknown contexts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {"op": "stat"},
    {"op": "append", "n": 4},
    {"op": "append", "n": 4, "inline": True},
    {"op": "read", "streams": [[0, 1]], "start": 0, "end": 1},
    {"op": "delete"},
    {"op": "flush"},
], ids=["stat", "append", "append-inline", "read", "delete", "flush"])
def test_unknown_context(hcached, fields):
    ctx = new_ctx(hcached)  # exists in "default", not in the namespace asked for
    reply = hcached.request({"v": V, "id": 1, "ctx": "no-such-ctx", **fields})
    assert_refused(hcached, reply, UNKNOWN_CONTEXT, "'no-such-ctx'", "'default'")
    reply = hcached.request({"v": V, "id": 1, "ns": "elsewhere", "ctx": ctx, **fields})
    assert_refused(hcached, reply, UNKNOWN_CONTEXT, ctx, "'elsewhere'")


# -- append --------------------------------------------------------------------------------------------

def test_append_of_zero_tokens(hcached, raw):
    ctx = new_ctx(hcached, n_tokens=3)
    reply, _ = raw.exchange("append", ctx=ctx, n=0)
    assert_refused(hcached, reply, BAD_REQUEST, "0 tokens", "at least one")
    reply, _ = raw.exchange("append", [b"", b"", b"", b""], ctx=ctx, n=0, inline=True)
    assert_refused(hcached, reply, BAD_REQUEST, "0 tokens")
    assert n_tokens(hcached, ctx) == 3
    reply, _ = raw.exchange("append", ctx=ctx, n=2)  # not left busy
    assert reply["ok"]
    raw.exchange("abort", lease=reply["lease"])


def test_inline_append_round_trips_through_frames(hcached, raw):
    """The sizes the negative tests below get wrong are the right ones: this append with them works."""
    ctx = new_ctx(hcached, n_tokens=100)
    gen = torch.Generator().manual_seed(5)
    frames = [torch.randint(0, 256, (b * 30,), dtype=torch.uint8, generator=gen).numpy().tobytes()
              for b in STREAM_BYTES]
    reply, _ = raw.exchange("append", frames, ctx=ctx, n=30, inline=True)
    assert reply["ok"] and reply["n_tokens"] == 130
    streams = [[0, Rep.HIDDEN], [1, Rep.HIDDEN], [1, Rep.KV], [GEOM.num_layers, Rep.TOKENS]]
    reply, payload = raw.exchange("read", ctx=ctx, streams=streams, start=100, end=130, inline=True)
    assert reply["ok"] and payload == frames
    reply, _ = raw.exchange("status")
    assert reply["leases"] == 0  # inline reads hold no lease


@pytest.mark.parametrize("case", ["one-frame-short", "one-frame-extra", "one-byte-short", "one-byte-long",
                                  "sizes-swapped", "no-frames"])
def test_inline_append_whose_frames_do_not_match_the_geometry(hcached, raw, case):
    ctx = new_ctx(hcached, n_tokens=70)
    n = 10
    frames = [bytes([7]) * (b * n) for b in STREAM_BYTES]
    if case == "one-frame-short":
        frames = frames[:-1]
    elif case == "one-frame-extra":
        frames.append(frames[0])
    elif case == "one-byte-short":
        frames[2] = frames[2][:-1]
    elif case == "one-byte-long":
        frames[1] += b"\x00"
    elif case == "sizes-swapped":
        frames[0], frames[3] = frames[3], frames[0]
    else:
        frames = []
    reply, _ = raw.exchange("append", frames, ctx=ctx, n=n, inline=True)
    sizes = [b * n for b in STREAM_BYTES]
    assert_refused(hcached, reply, BAD_REQUEST, "inline append of 10 tokens", f"{len(sizes)} payload frames",
                   str(sizes), str([len(f) for f in frames]))
    assert n_tokens(hcached, ctx) == 70  # nothing of it was committed
    reply, _ = raw.exchange("status")
    assert reply["leases"] == 0
    frames = [bytes(b * n) for b in STREAM_BYTES]
    reply, _ = raw.exchange("append", frames, ctx=ctx, n=n, inline=True)  # the context was not left busy
    assert reply["ok"] and reply["n_tokens"] == 80


def test_leased_append_refuses_payload_frames(hcached, raw):
    ctx = new_ctx(hcached)
    reply, _ = raw.exchange("append", [b"\x00" * 256], ctx=ctx, n=1)
    assert_refused(hcached, reply, BAD_REQUEST, "payload frames", "inline")
    assert n_tokens(hcached, ctx) == 0


def test_append_while_another_append_lease_is_open_is_busy(hcached, raw):
    ctx = new_ctx(hcached, n_tokens=10)
    lease, _ = raw.exchange("append", ctx=ctx, n=5)
    assert lease["ok"] and (lease["start"], lease["end"]) == (10, 15)
    other = Raw(hcached)
    try:
        reply, _ = other.exchange("append", ctx=ctx, n=1)
        assert_refused(hcached, reply, BUSY, ctx, "append in progress")
        reply, _ = other.exchange("append", [bytes(b) for b in STREAM_BYTES], ctx=ctx, n=1, inline=True)
        assert_refused(hcached, reply, BUSY, "append in progress")
        reply, _ = raw.exchange("append", ctx=ctx, n=1)  # the lease holder too: one writer at a time
        assert_refused(hcached, reply, BUSY)
        reply, _ = raw.exchange("abort", lease=lease["lease"])
        assert reply["ok"]
        assert n_tokens(hcached, ctx) == 10
        reply, _ = other.exchange("append", ctx=ctx, n=1)
        assert reply["ok"] and reply["start"] == 10
        reply, _ = other.exchange("commit", lease=reply["lease"])
        assert reply["ok"] and reply["n_tokens"] == 11
    finally:
        other.close()


def test_append_that_could_never_fit_the_arena_is_over_capacity_at_once(hcached, raw):
    ctx = new_ctx(hcached, n_tokens=10)
    arena = hcached.request({"v": V, "op": "hello", "id": 1})["arena_size"]
    n = 200_000  # ~150 MiB of chunk images: more than the whole 128 MiB arena
    t0 = time.monotonic()
    reply, _ = raw.exchange("append", ctx=ctx, n=n)
    assert time.monotonic() - t0 < 2.0, "an append that can never fit waited instead of being refused"
    assert_refused(hcached, reply, OVER_CAPACITY, f"{n} tokens", str(arena), "--dram")
    assert n_tokens(hcached, ctx) == 10
    reply, _ = raw.exchange("append", ctx=ctx, n=64)  # and it is not left busy
    assert reply["ok"]
    assert raw.exchange("commit", lease=reply["lease"])[0]["n_tokens"] == 74


def test_append_of_a_trillion_tokens_is_over_capacity_at_once(daemon_factory):
    d = daemon_factory()
    vm_size = next(int(line.split()[1]) for line in open(f"/proc/{d.proc.pid}/status")
                   if line.startswith("VmSize:")) * 1024
    resource.prlimit(d.proc.pid, resource.RLIMIT_AS, (vm_size + (256 << 20),) * 2)  # keep the host safe
    ctx = new_ctx(d)
    t0 = time.monotonic()
    reply = d.request({"v": V, "op": "append", "id": 1, "ctx": ctx, "n": 2**40}, timeout_ms=60_000)
    elapsed = time.monotonic() - t0
    assert_refused(d, reply, OVER_CAPACITY, "tokens")
    assert elapsed < 1.0


# -- read ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("start", "end", "words"), [
    (0, 21, ["[0, 21)", "holds 20 tokens"]),
    (20, 21, ["[20, 21)"]),
    (15, 10, ["[15, 10)"]),
    (100, 200, ["[100, 200)"]),
])
def test_read_of_a_token_range_past_the_end(hcached, raw, start, end, words):
    ctx = new_ctx(hcached, n_tokens=20)
    for inline in (False, True):
        reply, payload = raw.exchange("read", ctx=ctx, streams=[[0, 1]], start=start, end=end, inline=inline)
        assert_refused(hcached, reply, BAD_REQUEST, "outside context", *words)
        assert payload == []
    assert raw.exchange("status")[0]["leases"] == 0


@pytest.mark.parametrize(("stream", "words"), [
    ([0, Rep.KV], ["representation 2", "layer 0"]),  # kv is kept for layer 1 only
    ([2, Rep.HIDDEN], ["representation 1", "layer 2"]),  # there are 2 layers
    ([0, 9], ["representation 9"]),
    ([-1, Rep.HIDDEN], ["layer -1"]),
])
def test_read_of_a_stream_the_context_does_not_store(hcached, raw, stream, words):
    ctx = new_ctx(hcached, n_tokens=20)
    reply, _ = raw.exchange("read", ctx=ctx, streams=[[1, Rep.HIDDEN], stream], start=0, end=20)
    assert_refused(hcached, reply, BAD_REQUEST, "stores no", *words)
    assert raw.exchange("status")[0]["leases"] == 0  # the good stream before the bad one is not left leased


def test_a_refused_read_does_not_count_as_restored(hcached, raw):
    ctx = new_ctx(hcached, n_tokens=20)
    before = raw.exchange("status")[0]["bytes_restored"]
    reply, _ = raw.exchange("read", ctx=ctx, streams=[[0, Rep.HIDDEN], [0, Rep.KV]], start=0, end=20)
    assert_refused(hcached, reply, BAD_REQUEST, "stores no")
    assert raw.exchange("status")[0]["bytes_restored"] == before


# -- leases --------------------------------------------------------------------------------------------

def test_a_lease_that_is_not_the_callers_is_refused_and_left_alone(hcached, raw):
    ctx = new_ctx(hcached, n_tokens=4)
    lease, _ = raw.exchange("append", ctx=ctx, n=60)
    assert lease["ok"]
    with HCacheClient(hcached.socket) as b:
        t = b._aio._t  # client B's own transport: another identity on the daemon's socket
        for op in ("commit", "abort"):
            with pytest.raises(LeaseError) as err:
                b._run(t.call(op, lease=lease["lease"]))
            assert str(lease["lease"]) in str(err.value) and "another client's" in str(err.value)
        other = Raw(hcached)
        try:
            for op in ("commit", "abort"):
                reply, _ = other.exchange(op, lease=lease["lease"])
                assert_refused(hcached, reply, BAD_LEASE, str(lease["lease"]))
        finally:
            other.close()
    reply, _ = raw.exchange("commit", lease=lease["lease"])  # A still owns it
    assert reply["ok"] and reply["n_tokens"] == 64
    assert n_tokens(hcached, ctx) == 64


def test_committing_a_lease_twice(hcached, raw):
    ctx = new_ctx(hcached)
    lease, _ = raw.exchange("append", ctx=ctx, n=3)
    assert raw.exchange("commit", lease=lease["lease"])[0]["n_tokens"] == 3
    reply, _ = raw.exchange("commit", lease=lease["lease"])
    assert_refused(hcached, reply, BAD_LEASE, str(lease["lease"]), "request a new one")
    reply, _ = raw.exchange("abort", lease=lease["lease"])
    assert_refused(hcached, reply, BAD_LEASE)
    assert n_tokens(hcached, ctx) == 3


def test_leases_of_the_wrong_kind_and_made_up_ids(hcached, raw):
    ctx = new_ctx(hcached, n_tokens=10)
    read, _ = raw.exchange("read", ctx=ctx, streams=[[0, 1]], start=0, end=10)
    append, _ = raw.exchange("append", ctx=ctx, n=1)
    reply, _ = raw.exchange("commit", lease=read["lease"])
    assert_refused(hcached, reply, BAD_LEASE, "append lease")
    reply, _ = raw.exchange("release", lease=append["lease"])
    assert_refused(hcached, reply, BAD_LEASE, "read lease")
    for made_up in (0, -1, 2**63 - 1, append["lease"] + 1000):
        reply, _ = raw.exchange("commit", lease=made_up)
        assert_refused(hcached, reply, BAD_LEASE, str(made_up))
    assert raw.exchange("release", lease=read["lease"])[0]["ok"]
    assert raw.exchange("commit", lease=append["lease"])[0]["n_tokens"] == 11
    assert raw.exchange("status")[0]["leases"] == 0


# -- and after all that ----------------------------------------------------------------------------------

def test_a_normal_client_still_works_afterwards(hcached):
    gen = torch.Generator().manual_seed(11)
    exp = Expected(geometry(GQA, "bfloat16"))
    with HCacheClient(hcached.socket) as c:
        c.open("after", model="tiny", geometry=exp.geometry, layers=exp.layers)
        for n in (100, 40):
            c.append("after", *exp.round(n, gen))
            assert_restores(c, "after", exp)
        c.flush("after")
        assert c.stat("after").durable_tokens == 140
        assert c.status()["leases"] == 0  # no refused request above left a lease behind
    assert_still_serves(hcached)
