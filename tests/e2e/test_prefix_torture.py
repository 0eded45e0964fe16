"""Saves of contexts that share prefixes (forks, the same tokens saved again, truncates, deletes) while hcached is
SIGKILLed at random: every acknowledged context restores exactly, and fsck finds no leaked or dangling chunk."""

import random
import threading
import time

import torch

from hcache.client import HCacheClient, HCacheError
from tests.e2e.data import GQA, Expected, geometry

BASE = 192  # three full chunks every context starts with
SECONDS = 25.0


def _prefix_of(exp: Expected, n: int) -> Expected:
    return Expected(exp.geometry, tokens=[torch.cat(exp.tokens)[:n]], hidden=[exp.all("hidden")[:, :n]],
                    kv=[exp.all("kv")[:, :n]])


def _check(c: HCacheClient, ctx: str, exp: Expected) -> None:
    n = exp.n_tokens
    assert c.stat(ctx).n_tokens >= n, ctx
    for rep in ("hidden", "kv"):
        got, want = c.restore(ctx, rep, end=n), exp.all(rep)
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)), (ctx, rep)
    assert torch.equal(c.tokens(ctx, 0, n), torch.cat(exp.tokens)), ctx


def test_shared_prefixes_survive_sigkill_at_random(daemon_factory):
    d = daemon_factory(engine="threads", dram="256MiB")
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    g = geometry(GQA, "float32")
    base = Expected(g)
    acked: dict[str, Expected] = {}  # contexts whose last save was acknowledged durable, with what they hold
    with HCacheClient(d.socket) as c:
        c.open("base", model="m", geometry=g, layers=base.layers)
        c.append("base", *base.round(BASE, gen))
        c.flush("base")
    acked["base"] = base
    stop = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        while not stop.wait(rng.uniform(0.3, 1.2)):
            d.kill()
            kills += 1
            d.start()

    thread = threading.Thread(target=killer)
    thread.start()
    made = 0
    try:
        with HCacheClient(d.socket, timeout=10, connect_timeout=10) as c:
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                made += 1
                ctx, way = f"c{made}", rng.choice(["fork", "same tokens", "fork part", "truncate", "delete"])
                try:
                    if way == "delete" and len(acked) > 1:
                        victim = rng.choice([k for k in acked if k != "base"])
                        acked.pop(victim, None)  # gone or not, it is no longer expected
                        c.delete(victim)
                        continue
                    longer = [k for k, e in acked.items() if k != "base" and e.n_tokens > 1]
                    if way == "truncate" and longer:
                        victim = rng.choice(longer)
                        exp = acked.pop(victim)
                        n = rng.randrange(1, exp.n_tokens)
                        c.truncate(victim, n)
                        acked[victim] = _prefix_of(exp, n)
                        continue
                    if way == "same tokens":  # saved again from scratch: its full chunks meet the stored ones
                        exp = _prefix_of(base, BASE)
                        c.open(ctx, model="m", geometry=g, layers=exp.layers)
                        c.append(ctx, torch.cat(exp.tokens), {"hidden": exp.all("hidden"), "kv": exp.all("kv")})
                    else:
                        n = BASE if way == "fork" else rng.randrange(1, BASE)
                        c.fork("base", ctx, n)
                        exp = _prefix_of(base, n)
                    for _ in range(rng.randrange(1, 3)):
                        c.append(ctx, *exp.round(rng.randrange(1, 150), gen))
                    c.flush(ctx)
                    acked[ctx] = exp
                except HCacheError:
                    continue  # hcached went away mid-save: nothing acknowledged
    finally:
        stop.set()
        thread.join()
    assert kills >= 5 and len(acked) >= 10, (kills, len(acked))
    d.kill()
    d.start()
    with HCacheClient(d.socket) as c:
        for ctx, exp in acked.items():
            _check(c, ctx, exp)
        fsck = c._run(c._aio._call("fsck"))[0]
        assert not fsck["problems"] and fsck["leaked"] == 0 and fsck["dangling"] == 0, fsck
        assert fsck["shared"] > 0
