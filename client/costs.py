"""Per-layer restore costs as functions of the token count: profiles, their JSON form and where they are kept."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcache.layout.geometry import DTYPE_SIZES, Geometry, Rep
from hcache.layout.paths import default_state_dir

PROFILE_VERSION = 1
DEVICES = ("cuda", "cpu")
# Effective dense FLOP/s assumed when nothing was measured: a datacenter GPU at realistic GEMM efficiency,
# a many-core CPU in fp32.
ASSUMED_FLOPS = {"cuda": 100e12, "cpu": 0.5e12}
ASSUMED_BANDWIDTH = 2e9  # bytes/s: one NVMe SSD (hcached measured 1.3-2.9 GB/s on its reference host)
ASSUMED_LATENCY = 100e-6  # seconds per read request: a ZeroMQ round trip plus queueing
ASSUMED_ARENA_BANDWIDTH = 10e9  # bytes/s: a read of chunks already in hcached's arena is a memory copy
# A read request costs about a millisecond besides its bytes (lease, copy, release through the daemon): restore
# reads small layers several to a request, up to this many bytes, so a short context is not all request overhead.
READ_BYTES = 4 << 20
# seconds a layer's projection costs per call beyond its FLOPs (kernel launches, framework overhead); a
# recompute runs some 8x as many kernels (norms, Q, K, V, O, attention, MLP, residuals)
ASSUMED_CALL = {"cuda": 20e-6, "cpu": 100e-6}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True, slots=True)
class LayerCosts:
    """Seconds one layer takes for each restore step at one token count."""

    c_h: float  # project a hidden state to K/V
    c_tok: float  # recompute the layer from its input
    io_h: float  # read its hidden state
    io_kv: float  # read its K/V


@dataclass(frozen=True)
class Profile:
    """Fitted per-layer costs, in seconds, of one model geometry on one host and device."""

    geometry: Geometry
    c_h: tuple[float, ...]  # (a, b): a·T + b
    c_tok: tuple[float, ...]  # (a, b, c): a·T² + b·T + c
    io: tuple[float, ...]  # reads from disk: (seconds per byte, seconds per read request)
    device: str = "cuda"
    source: str = "analytical"  # or "measured"
    samples: dict[str, list[list[float]]] = field(default_factory=dict)  # measured (x, seconds) per cost
    io_arena: tuple[float, ...] = ()  # reads of chunks in hcached's arena, as io; () where unmeasured: as disk
    # Of one context to restore: the share of its hidden states' and of its K/V's chunks in the arena.
    resident: tuple[float, float] = (0.0, 0.0)

    @property
    def fingerprint(self) -> str:
        return profile_fingerprint(self.geometry, self.device)

    @property
    def read_bandwidth(self) -> float:
        """Bytes per second one layer's read achieves past its request latency."""
        return 1 / self.io[0] if self.io[0] > 0 else math.inf

    def costs(self, tokens: int) -> LayerCosts:
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if tokens == 0:
            return LayerCosts(0.0, 0.0, 0.0, 0.0)
        t = float(tokens)
        arena = self.io_arena or self.io

        def read(rep: Rep, share: float) -> float:
            nbytes = t * self.geometry.token_bytes(rep)
            per_request = max(1, READ_BYTES // int(nbytes))  # layers one request carries: they share its latency

            def seconds(io: tuple[float, ...]) -> float:
                return max(io[0] * nbytes + io[1] / per_request, 0.0)

            return share * seconds(arena) + (1 - share) * seconds(self.io)

        hidden, kv = self.resident
        return LayerCosts(_poly(self.c_h, t), _poly(self.c_tok, t), read(Rep.HIDDEN, hidden), read(Rep.KV, kv))

    def for_passes(self, passes: int) -> Profile:
        """The costs of restoring a context the model built in `passes` forward passes: exact restores project
        and recompute pass by pass, so each layer pays the per-call constant once per pass."""
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        per_pass = (*self.c_h[:-1], self.c_h[-1] * passes), (*self.c_tok[:-1], self.c_tok[-1] * passes)
        return dataclasses.replace(self, c_h=per_pass[0], c_tok=per_pass[1])

    def for_resident(self, hidden: float, kv: float) -> Profile:
        """The costs of restoring a context with these shares of its hidden states' and K/V's chunks in hcached's
        arena: those are read at the arena's rate, the rest from disk."""
        if not (0 <= hidden <= 1 and 0 <= kv <= 1):
            raise ValueError(f"resident shares must be within 0..1, got {hidden}, {kv}")
        return dataclasses.replace(self, resident=(hidden, kv))

    def to_dict(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "fingerprint": self.fingerprint, "source": self.source,
                "device": self.device, "geometry": self.geometry.to_dict(), "c_h": list(self.c_h),
                "c_tok": list(self.c_tok), "io": list(self.io), "samples": self.samples,
                **({"io_arena": list(self.io_arena)} if self.io_arena else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        if not isinstance(d, Mapping) or d.get("version") != PROFILE_VERSION:
            raise ValueError(f"not an hcache profile of version {PROFILE_VERSION}: re-run the profiler")
        device = d.get("device")
        if device not in DEVICES:
            raise ValueError(f"profile device {device!r} is not one of {DEVICES}")
        return cls(Geometry.from_dict(d.get("geometry")), _coefficients(d, "c_h", 2), _coefficients(d, "c_tok", 3),
                   _coefficients(d, "io", 2), device, str(d.get("source", "measured")), dict(d.get("samples", {})),
                   _coefficients(d, "io_arena", 2) if "io_arena" in d else ())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        return cls.from_dict(json.loads(text))


def _poly(coefficients: tuple[float, ...], x: float) -> float:
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return max(value, 0.0)


def _coefficients(d: Mapping[str, Any], name: str, n: int) -> tuple[float, ...]:
    value = d.get(name)
    if (not isinstance(value, list) or len(value) != n
            or not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in value)):
        raise ValueError(f"profile field {name!r} must be {n} finite non-negative numbers, got {value!r}")
    return tuple(float(v) for v in value)


def profile_fingerprint(geometry: Geometry, device: str = "cuda") -> str:
    """The name a profile is kept under: costs depend on the geometry and the device, not on the weights."""
    g = geometry
    return f"L{g.num_layers}-D{g.hidden_size}-kv{g.num_kv_heads}x{g.head_dim}-{g.dtype}-{device}"


def analytical_profile(geometry: Geometry, *, device: str = "cuda", flops: float | None = None,
                       bandwidth: float = ASSUMED_BANDWIDTH, latency: float = ASSUMED_LATENCY,
                       intermediate_size: int | None = None) -> Profile:
    """Costs from FLOP counts and an assumed compute rate (FLOP/s) and read bandwidth (bytes/s).

    Per layer and token: projection 2·D·2·kv_dim (K and V); recompute 2·(2·D² + 2·D·kv_dim) for Q, O, K, V
    plus 6·D·I for a gated MLP (I defaults to 8D/3, which makes an MHA layer the usual 24·D²), and
    2·T·D for causal attention (QKᵀ and AV over half the T×T matrix), hence 2·T²·D over T tokens.
    """
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {DEVICES}")
    rate = ASSUMED_FLOPS[device] if flops is None else flops
    if rate <= 0 or bandwidth <= 0 or latency < 0:
        raise ValueError("flops and bandwidth must be > 0 and latency >= 0")
    d = geometry.hidden_size
    kv_dim = geometry.num_kv_heads * geometry.head_dim
    inter = 8 * d / 3 if intermediate_size is None else intermediate_size
    per_token = 4 * d * d + 4 * d * kv_dim + 6 * d * inter
    call = ASSUMED_CALL[device]
    return Profile(geometry, c_h=(4 * d * kv_dim / rate, call), c_tok=(2 * d / rate, per_token / rate, 8 * call),
                   io=(1 / bandwidth, latency), device=device, source="analytical",
                   io_arena=(1 / ASSUMED_ARENA_BANDWIDTH, latency))


def geometry_from_config(config: Mapping[str, Any], dtype: str | None = None) -> Geometry:
    """The Geometry of a Hugging Face config (config.json as a dict); `dtype` overrides the config's."""
    cfg = config.get("text_config") or config  # multimodal configs nest the language model's
    try:
        d, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    except KeyError as e:
        raise ValueError(f"config has no {e.args[0]!r}: pass a decoder-only transformers config.json") from None
    name = dtype or cfg.get("dtype") or cfg.get("torch_dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPE_SIZES:
        raise ValueError(f"dtype {name!r} cannot be stored: use one of {sorted(DTYPE_SIZES)}")
    return Geometry(num_layers=layers, hidden_size=d, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                    head_dim=cfg.get("head_dim") or d // heads, dtype=name)


def profiles_dir(state_dir: Path | None = None) -> Path:
    return (state_dir or default_state_dir()) / "profiles"


def load_profile(fingerprint: str, state_dir: Path | None = None) -> Profile | None:
    """The measured profile kept under this fingerprint, or None when there is none."""
    if not _SAFE_NAME.match(fingerprint):
        raise ValueError(f"profile fingerprint {fingerprint!r} may hold only letters, digits, '.', '_' and '-'")
    path = profiles_dir(state_dir) / f"{fingerprint}.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Profile.from_json(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e} (delete it or re-run the profiler)") from None


def save_profile(profile: Profile, state_dir: Path | None = None) -> Path:
    """Write the profile under its fingerprint, atomically; returns the file."""
    directory = profiles_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{profile.fingerprint}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(profile.to_json())
    os.replace(tmp, path)
    return path


def profile_for(geometry: Geometry, device: str | None = None, state_dir: Path | None = None,
                intermediate_size: int | None = None) -> Profile:
    """This host's measured profile for the geometry (on `device`, else preferring cuda), else the analytical one."""
    for dev in (device,) if device else DEVICES:
        found = load_profile(profile_fingerprint(geometry, dev), state_dir)
        if found is not None:
            return found
    return analytical_profile(geometry, device=device or "cuda", intermediate_size=intermediate_size)
