"""The restore planner: per layer H, KV or RE (a recomputed prefix), chosen to minimise the pipelined makespan."""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from hcache.client.costs import LayerCosts, Profile, profile_for
from hcache.layout.geometry import Geometry, Rep

METHODS = ("RE", "H", "KV")
STORED = frozenset({"H", "KV"})
_LONG = {"RE": "recompute", "H": "hidden", "KV": "kv"}


@dataclass(frozen=True, slots=True)
class Step:
    """One layer of a plan, with its predicted times in seconds."""

    layer: int
    method: str
    io: float  # its read on the IO stream
    compute: float  # its recompute or projection on the compute stream
    ready: float  # when its K/V are in place, from the start of the restore


@dataclass(frozen=True)
class Plan:
    """A method per layer and the pipelined schedule the cost model predicts for it."""

    name: str
    tokens: int
    steps: tuple[Step, ...]
    io_time: float  # busy time of the IO stream
    compute_time: float  # busy time of the compute stream
    makespan: float
    profile: Profile
    available: tuple[frozenset[str], ...] | None = None  # what was stored per layer; None: anything

    @property
    def methods(self) -> list[str]:
        return [s.method for s in self.steps]

    @property
    def recompute_prefix(self) -> int:
        return self.methods.count("RE")

    def counts(self) -> dict[str, int]:
        return {m: self.methods.count(m) for m in METHODS if m in self.methods}

    def baselines(self) -> dict[str, Plan | None]:
        """The single-method plans and the paper's closed form for the same tokens; None where what is stored
        rules one out."""
        plans = {f"all {_LONG[m]}": single_method_plan(m, self.tokens, self.profile) for m in METHODS}
        plans["closed form"] = closed_form_plan(self.tokens, self.profile)
        return {name: p if _allowed(p.methods, self.available) else None for name, p in plans.items()}

    def to_dict(self) -> dict[str, Any]:
        def totals(p: Plan) -> dict[str, Any]:
            return {"counts": p.counts(), "io_s": p.io_time, "compute_s": p.compute_time, "makespan_s": p.makespan}

        return {"name": self.name, "tokens": self.tokens, "methods": self.methods,
                "profile": {"fingerprint": self.profile.fingerprint, "source": self.profile.source},
                "layers": [{"layer": s.layer, "method": s.method, "io_s": s.io, "compute_s": s.compute,
                            "ready_s": s.ready} for s in self.steps],
                **totals(self),
                "baselines": {n: None if p is None else totals(p) for n, p in self.baselines().items()}}

    def explain(self) -> str:
        """A table: each layer's method and predicted times, then totals against the other plans."""
        p, g = self.profile, self.profile.geometry
        head = (f"plan {self.name!r} for {self.tokens} tokens over {g.num_layers} layers ({_counts(self)}); "
                f"{p.source} {p.device} profile {p.fingerprint}, reads at {p.read_bandwidth / 1e9:.2f} GB/s")
        rows = [["LAYER", "METHOD", "READ ms", "COMPUTE ms", "READY ms"]]
        rows += [[str(s.layer), s.method, _ms(s.io) if s.method != "RE" else "-",
                  _ms(s.compute) if s.method != "KV" else "-", _ms(s.ready)] for s in self.steps]
        rows.append(["total", "", _ms(self.io_time), _ms(self.compute_time), _ms(self.makespan)])
        cmp = [["PLAN", "READ ms", "COMPUTE ms", "MAKESPAN ms", "VS THIS"],
               [f"this ({_counts(self)})", _ms(self.io_time), _ms(self.compute_time), _ms(self.makespan), "1.00x"]]
        for name, other in self.baselines().items():
            if other is None:
                cmp.append([name, "-", "-", "-", "not stored"])
            else:
                ratio = other.makespan / self.makespan if self.makespan else 1.0
                cmp.append([f"{name} ({_counts(other)})", _ms(other.io_time), _ms(other.compute_time),
                            _ms(other.makespan), f"{ratio:.2f}x"])
        return "\n".join([head, _table(rows), "", _table(cmp)])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _counts(p: Plan) -> str:
    return ", ".join(f"{m} {n}" for m, n in p.counts().items())


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _allowed(methods: Sequence[str], available: Sequence[Collection[str]] | None) -> bool:
    return available is None or all(m == "RE" or m in a for m, a in zip(methods, available, strict=True))


def _normalise(available: Sequence[Collection[str]] | None, n: int) -> tuple[frozenset[str], ...] | None:
    if available is None:
        return None
    if len(available) != n:
        raise ValueError(f"available must list what is stored for each of the {n} layers, got {len(available)}")
    out = tuple(frozenset(a) for a in available)
    for i, a in enumerate(out):
        if not a <= STORED:
            raise ValueError(f"available[{i}] = {sorted(a)}: a layer stores only 'H' and/or 'KV'")
    return out


def simulate(methods: Sequence[str], tokens: int, profile: Profile, name: str = "custom",
             available: Sequence[Collection[str]] | None = None) -> Plan:
    """Predict the schedule of a per-layer plan: the compute stream recomputes the RE prefix, then projects each
    H layer once its read is done; the IO stream reads the H and KV layers in layer order from time 0. Doing the
    compute in order of when it can start (RE at once, H as reads finish) is optimal for one stream."""
    n = profile.geometry.num_layers
    if len(methods) != n:
        raise ValueError(f"a plan needs a method for each of the {n} layers, got {len(methods)}")
    r = _prefix_length(methods)
    if any(m == "RE" for m in methods[r:]) or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be a prefix of 'RE' then 'H' or 'KV', got {list(methods)}")
    stored = _normalise(available, n)
    if not _allowed(methods, stored):
        raise ValueError(f"plan {list(methods)} uses a representation that is not stored ({stored})")
    c = profile.costs(tokens)
    steps, io_clock, clock = [], 0.0, 0.0
    for layer, m in enumerate(methods):
        io = {"H": c.io_h, "KV": c.io_kv}.get(m, 0.0)
        compute = {"RE": c.c_tok, "H": c.c_h}.get(m, 0.0)
        io_clock += io
        if m == "KV":
            ready = io_clock
        else:
            clock = (clock if m == "RE" else max(clock, io_clock)) + compute
            ready = clock
        steps.append(Step(layer, m, io, compute, ready))
    return Plan(name, tokens, tuple(steps), sum(s.io for s in steps), sum(s.compute for s in steps),
                max(io_clock, clock), profile, stored)


def _prefix_length(methods: Sequence[str]) -> int:
    r = 0
    while r < len(methods) and methods[r] == "RE":
        r += 1
    return r


def single_method_plan(method: str, tokens: int, profile: Profile) -> Plan:
    """Every layer restored by one method: "RE", "H" or "KV"."""
    return simulate([method] * profile.geometry.num_layers, tokens, profile, f"all {_LONG.get(method, method)}")


def closed_form_plan(tokens: int, profile: Profile) -> Plan:
    """The paper's rule: when projecting is slower than reading hidden states, complement H with KV, else with
    RE, splitting the layers so that both streams are equally busy (rounded to whole layers)."""
    n, c = profile.geometry.num_layers, profile.costs(tokens)
    if c.c_h > c.io_h:  # h·c_h = h·io_h + (n-h)·io_kv
        h = _clamp(n * c.io_kv / (c.c_h - c.io_h + c.io_kv), n)
        methods = ["H"] * h + ["KV"] * (n - h)
    else:  # r·c_tok + (n-r)·c_h = (n-r)·io_h
        denominator = c.c_tok + c.io_h - c.c_h
        r = _clamp(n * (c.io_h - c.c_h) / denominator, n) if denominator > 0 else 0
        methods = ["RE"] * r + ["H"] * (n - r)
    return simulate(methods, tokens, profile, "closed form")


def _clamp(x: float, n: int) -> int:
    return min(n, max(0, round(x)))


def search_plan(tokens: int, profile: Profile, available: Sequence[Collection[str]] | None = None) -> Plan:
    """The plan with the least predicted makespan (then the least total work) over every recompute prefix r and
    every count of H layers after it.

    For a given r and count, the H layers are the earliest layers that can be H: the k-th H layer's read ends at
    k·io_h plus io_kv for each KV layer read before it, and nothing else in the schedule depends on which layers
    they are, so taking the earliest ones makes every projection's release time (and so the makespan) least.
    """
    n = profile.geometry.num_layers
    stored = _normalise(available, n)
    options = stored or (STORED,) * n
    c = profile.costs(tokens)
    unrecoverable = [i for i, a in enumerate(options) if not a]
    best: tuple[float, float, int, list[int]] | None = None
    for r in range(unrecoverable[-1] + 1 if unrecoverable else 0, n + 1):
        h_layers = [i for i in range(r, n) if options[i] == {"H"}]
        # where K/V read no slower than hidden states, H only adds work to a layer that could be KV
        either = [i for i in range(r, n) if options[i] == STORED] if c.io_kv > c.io_h else []
        for count, (makespan, work) in enumerate(_sweep(r, h_layers, either, n, c)):
            if best is None or _better(makespan, work, best[0], best[1]):
                best = (makespan, work, r, sorted(h_layers + either[:count]))
    assert best is not None
    _, _, r, h_layers = best
    h_set = set(h_layers)
    methods = ["RE" if i < r else "H" if i in h_set else "KV" for i in range(n)]
    return simulate(methods, tokens, profile, "best", stored)


def _sweep(r: int, h_layers: list[int], either: list[int], n: int, c: LayerCosts) -> Iterator[tuple[float, float]]:
    """_evaluate() of h_layers plus the first 0, 1, 2, ... of `either`: one step each where every layer added comes
    after all H layers before it (nothing earlier in the schedule changes), else from scratch."""
    if h_layers and either and either[0] < h_layers[-1]:
        layers = list(h_layers)
        yield _evaluate(r, layers, n, c)
        for layer in either:
            bisect.insort(layers, layer)
            yield _evaluate(r, layers, n, c)
        return
    clock = r * c.c_tok
    for k, layer in enumerate(h_layers, 1):
        clock = max(clock, k * c.io_h + (layer - r + 1 - k) * c.io_kv) + c.c_h
    h = len(h_layers)
    for count in range(len(either) + 1):
        if count:
            h += 1
            clock = max(clock, h * c.io_h + (either[count - 1] - r + 1 - h) * c.io_kv) + c.c_h
        io_total = h * c.io_h + (n - r - h) * c.io_kv
        yield max(io_total, clock), io_total + r * c.c_tok + h * c.c_h


def _evaluate(r: int, h_layers: list[int], n: int, c: LayerCosts) -> tuple[float, float]:
    """simulate()'s makespan and total work without building the steps: the inner loop of the search."""
    h = len(h_layers)
    io_total = h * c.io_h + (n - r - h) * c.io_kv
    clock = r * c.c_tok
    for k, layer in enumerate(h_layers, 1):
        clock = max(clock, k * c.io_h + (layer - r + 1 - k) * c.io_kv) + c.c_h
    return max(io_total, clock), io_total + r * c.c_tok + h * c.c_h


def _better(makespan: float, work: float, best_makespan: float, best_work: float) -> bool:
    tolerance = 1e-9 * best_makespan
    if makespan < best_makespan - tolerance:
        return True
    return makespan <= best_makespan + tolerance and work < best_work - 1e-9 * best_work


def plan(geometry: Geometry, tokens: int, *, available: Sequence[Collection[str]] | None = None,
         profile: Profile | None = None) -> Plan:
    """The fastest restore plan for a context of `tokens` tokens: `available[i]` holds "H" and/or "KV" for what
    layer i stores (None: anything). Without a profile, this host's measured one, else the analytical one."""
    if profile is None:
        profile = profile_for(geometry)
    if profile.geometry != geometry:
        raise ValueError(f"profile {profile.fingerprint} is for {profile.geometry}, not {geometry}")
    return search_plan(tokens, profile, available)


def save_plan(geometry: Geometry, tokens: int, profile: Profile | None = None) -> dict[str, list[int]]:
    """Which layers a capture should store as "hidden" and as "kv": the restore plan for `tokens` with everything
    storable. Layers in its recompute prefix store the smaller of the two, so that a restore of a longer context,
    where recomputing costs more (it grows as T²), still has a read for them."""
    chosen = plan(geometry, tokens, profile=profile)
    smaller = "kv" if geometry.token_bytes(Rep.KV) < geometry.token_bytes(Rep.HIDDEN) else "hidden"
    store: dict[str, list[int]] = {"hidden": [], "kv": []}
    for s in chosen.steps:
        store[_LONG[s.method] if s.method != "RE" else smaller].append(s.layer)
    return store
