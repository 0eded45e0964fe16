"""Model geometry: how many bytes each layer's representations take per token."""

from dataclasses import asdict, dataclass
from enum import IntEnum

DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
# Per token of a context: its id and flags, little-endian int32 each. PASS_START marks the first token of
# each forward pass the model ran, so a restore can redo the model's arithmetic in the same pieces.
TOKEN_RECORD_BYTES = 8
PASS_START = 1


class Rep(IntEnum):
    """What a stream of chunks holds."""

    HIDDEN = 1  # the layer's input hidden state, [T, D]
    KV = 2  # the layer's K and V, per token [2, n_kv, head_dim]
    TOKENS = 3  # the context's token ids and flags


REP_NAMES = {"hidden": Rep.HIDDEN, "kv": Rep.KV, "tokens": Rep.TOKENS}


def rep_from_name(name: str) -> Rep:
    """Map "hidden"/"kv"/"tokens" to a Rep, with an error that lists the choices."""
    try:
        return REP_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown representation {name!r}: use one of {sorted(REP_NAMES)}") from None


# Far above any real model; they keep a bad request from allocating per-layer state without end.
_LIMITS = {"num_layers": 4096, "hidden_size": 1 << 20, "num_kv_heads": 1 << 12, "head_dim": 1 << 14}


@dataclass(frozen=True, slots=True)
class Geometry:
    """The shape of a decoder stack as far as storage is concerned."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise ValueError(f"geometry.{name} must be an integer in 1..{limit}, got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"geometry.dtype {self.dtype!r} is not supported: use one of {sorted(DTYPE_SIZES)}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def token_bytes(self, rep: Rep) -> int:
        """Bytes one token takes in one layer for this representation."""
        if rep is Rep.HIDDEN:
            return self.hidden_size * self.itemsize
        if rep is Rep.KV:
            return 2 * self.num_kv_heads * self.head_dim * self.itemsize
        return TOKEN_RECORD_BYTES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        if not isinstance(d, dict):
            raise ValueError(f"geometry must be a mapping, got {type(d).__name__}")
        fields = ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "dtype")
        missing = [f for f in fields if f not in d]
        if missing:
            raise ValueError(f"geometry is missing {missing}")
        return cls(**{f: d[f] for f in fields})
