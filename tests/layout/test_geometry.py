"""Model geometry: bytes per token for each representation, and what a geometry may not be."""

import pytest

from hcache.layout.geometry import DTYPE_SIZES, TOKEN_RECORD_BYTES, Geometry, Rep, rep_from_name

MHA = dict(num_layers=32, hidden_size=4096, num_kv_heads=32, head_dim=128)  # Llama-2-7B
GQA = dict(num_layers=32, hidden_size=4096, num_kv_heads=8, head_dim=128)  # Llama-3-8B
TINY_GQA = dict(num_layers=3, hidden_size=192, num_kv_heads=2, head_dim=32)


@pytest.mark.parametrize("dtype", sorted(DTYPE_SIZES))
def test_token_bytes_mha(dtype):
    g = Geometry(dtype=dtype, **MHA)
    item = DTYPE_SIZES[dtype]
    assert g.itemsize == item
    assert g.token_bytes(Rep.HIDDEN) == 4096 * item
    assert g.token_bytes(Rep.KV) == 2 * 32 * 128 * item
    assert g.token_bytes(Rep.KV) == 2 * g.token_bytes(Rep.HIDDEN)  # K and V, each as wide as the hidden state
    assert g.token_bytes(Rep.TOKENS) == TOKEN_RECORD_BYTES == 8  # int32 id + flags, whatever the model dtype


@pytest.mark.parametrize("shape", [GQA, TINY_GQA], ids=["llama3", "tiny"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_token_bytes_gqa_hidden_is_larger_than_kv(shape, dtype):
    g = Geometry(dtype=dtype, **shape)
    item = DTYPE_SIZES[dtype]
    assert g.token_bytes(Rep.HIDDEN) == shape["hidden_size"] * item
    assert g.token_bytes(Rep.KV) == 2 * shape["num_kv_heads"] * shape["head_dim"] * item
    assert g.token_bytes(Rep.HIDDEN) > g.token_bytes(Rep.KV)


def test_llama3_numbers():
    g = Geometry(dtype="bfloat16", **GQA)
    assert (g.token_bytes(Rep.HIDDEN), g.token_bytes(Rep.KV)) == (8192, 4096)


@pytest.mark.parametrize("field", ["num_layers", "hidden_size", "num_kv_heads", "head_dim"])
@pytest.mark.parametrize("bad", [0, -1, 1.0, "8", None, True, [4]])
def test_geometry_fields_must_be_positive_integers(field, bad):
    with pytest.raises(ValueError, match=rf"geometry.{field} must be an integer in 1\.\.") as err:
        Geometry(**{**GQA, field: bad}, dtype="float16")
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("dtype", ["float64", "int8", "int32", "fp16", "", None])
def test_geometry_dtype_must_be_supported(dtype):
    with pytest.raises(ValueError, match="dtype") as err:
        Geometry(**GQA, dtype=dtype)
    assert "bfloat16" in str(err.value)  # lists the choices


def test_dict_round_trip_and_from_dict_errors():
    g = Geometry(dtype="bfloat16", **GQA)
    assert Geometry.from_dict(g.to_dict()) == g
    assert Geometry.from_dict({**g.to_dict(), "extra": 1}) == g  # unknown keys are ignored
    with pytest.raises(ValueError, match=r"missing \['head_dim', 'dtype'\]"):
        Geometry.from_dict({k: v for k, v in g.to_dict().items() if k not in ("head_dim", "dtype")})
    with pytest.raises(ValueError, match="mapping"):
        Geometry.from_dict([32, 4096, 8, 128, "bfloat16"])
    with pytest.raises(ValueError, match="num_kv_heads"):
        Geometry.from_dict({**g.to_dict(), "num_kv_heads": 0})


def test_geometry_is_frozen_and_comparable():
    g = Geometry(dtype="bfloat16", **GQA)
    assert g == Geometry(dtype="bfloat16", **GQA) and hash(g) == hash(Geometry(dtype="bfloat16", **GQA))
    assert g != Geometry(dtype="float16", **GQA)
    with pytest.raises(AttributeError):
        g.num_layers = 4


def test_rep_from_name():
    assert [rep_from_name(n) for n in ("hidden", "kv", "tokens")] == [Rep.HIDDEN, Rep.KV, Rep.TOKENS]
    with pytest.raises(ValueError, match="unknown representation 'plan'") as err:
        rep_from_name("plan")
    assert "hidden" in str(err.value) and "kv" in str(err.value)
