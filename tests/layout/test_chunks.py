"""Chunk headers, image verification, placement over data dirs, and how token ranges split into chunks."""

import itertools
import random

import msgpack
import pytest

from hcache.layout.chunks import (
    BLOCK,
    CHUNK_TOKENS,
    HEADER_SIZE,
    ChunkFormatError,
    ChunkHeader,
    align_up,
    chunk_image_size,
    chunk_range,
    data_dir_for,
    payload_crc,
    segments,
    verify_image,
)
from hcache.layout.geometry import Rep
from hcache.layout.keys import context_key

KEY = context_key("default", "chat-42")
META = {"ns": "default", "id": "chat-42", "model": "tiny", "geometry": {"num_layers": 3}, "layers": {"hidden": [0]}}


def header(**kw: object) -> ChunkHeader:
    fields = dict(ctx_key=KEY, layer=2, chunk=7, rep=Rep.KV, dtype="bfloat16", n_tokens=40, payload_len=40 * 256,
                  payload_crc=0xDEADBEEF, seq=123456789012345, meta=META)
    fields.update(kw)
    return ChunkHeader(**fields)


def packed(h: ChunkHeader) -> bytearray:
    buf = bytearray(b"\xaa" * HEADER_SIZE)  # stale bytes: pack_into must overwrite the whole header
    h.pack_into(memoryview(buf))
    return buf


def image(payload: bytes, layer: int = 1, chunk: int = 3, rep: Rep = Rep.HIDDEN, key: bytes = KEY) -> bytearray:
    """A chunk image as it sits in a slot: header, payload, padding to 4 KiB."""
    buf = bytearray(HEADER_SIZE + align_up(len(payload)))
    h = header(ctx_key=key, layer=layer, chunk=chunk, rep=rep, dtype="float32", n_tokens=len(payload) // 256,
               payload_len=len(payload), payload_crc=payload_crc(payload))
    h.pack_into(memoryview(buf))
    buf[HEADER_SIZE : HEADER_SIZE + len(payload)] = payload
    return buf


@pytest.mark.parametrize("rep", list(Rep))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int32"])
def test_header_round_trip(rep, dtype):
    h = header(rep=rep, dtype=dtype)
    buf = packed(h)
    assert len(buf) == HEADER_SIZE
    got = ChunkHeader.unpack(bytes(buf))
    assert got == h
    assert type(got.rep) is Rep and got.meta == META
    assert ChunkHeader.unpack(memoryview(buf)) == h  # from a view of an arena slot too


def test_header_round_trip_of_extreme_values():
    h = header(layer=2**32 - 1, chunk=2**32 - 1, n_tokens=CHUNK_TOKENS, payload_len=2**32 - 1,
               payload_crc=2**32 - 1, seq=2**64 - 1, meta={})
    assert ChunkHeader.unpack(packed(h)) == h


def test_every_flipped_header_byte_is_detected():
    good = packed(header())
    meta = msgpack.packb(META, use_bin_type=True)
    meta_end = good.index(meta) + len(meta)  # the fixed fields, then the metadata: all under the header crc
    assert meta_end < 200
    for i in range(meta_end):
        for bit in (0x01, 0x80):
            bad = bytearray(good)
            bad[i] ^= bit
            with pytest.raises(ChunkFormatError):
                ChunkHeader.unpack(bad)


@pytest.mark.parametrize(("offset", "words"), [(0, "magic"), (8, "version"), (20, "crc"), (70, "crc")])
def test_header_errors_say_what_is_wrong(offset, words):
    bad = packed(header())
    bad[offset] ^= 0x10
    with pytest.raises(ChunkFormatError, match=words):
        ChunkHeader.unpack(bad)


def test_zeroed_short_and_oversized_meta_headers():
    with pytest.raises(ChunkFormatError, match="magic"):
        ChunkHeader.unpack(bytes(HEADER_SIZE))  # a never-written slot
    with pytest.raises(ChunkFormatError, match="short"):
        ChunkHeader.unpack(packed(header())[: HEADER_SIZE - 1])
    with pytest.raises(ValueError, match="too large"):
        packed(header(meta={"blob": b"x" * HEADER_SIZE}))


def test_verify_image_accepts_the_right_chunk():
    payload = random.Random(1).randbytes(5 * 256)
    img = image(payload)
    h = verify_image(memoryview(img), KEY, 1, 3, Rep.HIDDEN)
    assert (h.n_tokens, h.payload_len) == (5, len(payload))


def test_verify_image_detects_payload_corruption():
    payload = random.Random(2).randbytes(64 * 256)
    for pos in (0, 1, len(payload) // 2, len(payload) - 1):
        img = image(payload)
        img[HEADER_SIZE + pos] ^= 0x04
        with pytest.raises(ChunkFormatError, match="payload crc mismatch in chunk 3 of layer 1"):
            verify_image(memoryview(img), KEY, 1, 3, Rep.HIDDEN)


def test_verify_image_ignores_the_padding_of_a_tail_chunk():
    payload = random.Random(4).randbytes(5 * 256)
    img = image(payload)
    assert len(img) == HEADER_SIZE + BLOCK
    img[-1] ^= 0xFF  # past payload_len: a tail chunk's padding is not part of its payload
    verify_image(memoryview(img), KEY, 1, 3, Rep.HIDDEN)


def test_verify_image_detects_a_truncated_image():
    payload = bytes(range(256)) * 10
    img = image(payload)
    with pytest.raises(ChunkFormatError, match="payload crc"):
        verify_image(memoryview(img)[: HEADER_SIZE + 100], KEY, 1, 3, Rep.HIDDEN)


@pytest.mark.parametrize(("key", "layer", "chunk", "rep"), [
    (KEY, 2, 3, Rep.HIDDEN),  # another layer's chunk
    (KEY, 1, 4, Rep.HIDDEN),  # another chunk of the layer
    (KEY, 1, 3, Rep.KV),  # another representation
    (context_key("default", "chat-43"), 1, 3, Rep.HIDDEN),  # another context
])
def test_verify_image_detects_a_header_of_another_chunk(key, layer, chunk, rep):
    img = image(bytes(256 * 3))
    with pytest.raises(ChunkFormatError, match="expected chunk"):
        verify_image(memoryview(img), key, layer, chunk, rep)


def test_chunk_image_size_is_header_plus_padded_payload():
    for token_bytes in (1, 4, 256, 4096, 5000, 2 * 8 * 128 * 2):
        size = chunk_image_size(token_bytes)
        assert size % BLOCK == 0
        assert HEADER_SIZE + CHUNK_TOKENS * token_bytes <= size < HEADER_SIZE + CHUNK_TOKENS * token_bytes + BLOCK
    assert [align_up(n) for n in (0, 1, 4095, 4096, 4097)] == [0, 4096, 4096, 4096, 8192]


@pytest.mark.parametrize("n_dirs", [1, 2, 3, 4, 7])
def test_data_dir_for_spreads_every_layers_chunks_over_all_dirs(n_dirs):
    for layer in range(10):
        dirs = [data_dir_for(layer, c, n_dirs) for c in range(3 * n_dirs)]
        assert all(0 <= d < n_dirs for d in dirs)
        for start in range(0, len(dirs), n_dirs):  # any n_dirs consecutive chunks hit every dir once
            assert sorted(dirs[start : start + n_dirs]) == list(range(n_dirs))
        for c in range(n_dirs):
            assert dirs[c + 1] == (dirs[c] + 1) % n_dirs  # round robin
    # chunk c of consecutive layers starts on different dirs: the first chunks of all layers spread too
    assert sorted(data_dir_for(layer, 0, n_dirs) for layer in range(n_dirs)) == list(range(n_dirs))


def _pairs() -> list[tuple[int, int]]:
    edges = sorted({0, 1, 62, 63, 64, 65, 127, 128, 129, 191, 192, 640, 1000})
    rng = random.Random(3)
    rand = [tuple(sorted(rng.sample(range(5000), 2))) for _ in range(300)]
    return list(itertools.product(edges, edges)) + rand


def test_chunk_range_is_exactly_the_chunks_touched():
    for start, end in _pairs():
        touched = sorted({t // CHUNK_TOKENS for t in range(start, end)})
        assert list(chunk_range(start, end)) == touched, (start, end)


def test_segments_tile_the_range_exactly():
    for start, end in _pairs():
        chunks = chunk_range(start, end)
        segs = segments(start, end)
        covered = []
        for k, (pos, first, count) in enumerate(segs):
            assert count > 0 and 0 <= first and first + count <= CHUNK_TOKENS, (start, end, segs)
            assert 0 <= pos < len(chunks)
            assert pos == k  # one piece per chunk, in chunk order
            if 0 < k < len(segs) - 1:
                assert (first, count) == (0, CHUNK_TOKENS)  # middle pieces are whole chunks
            covered += range(chunks[pos] * CHUNK_TOKENS + first, chunks[pos] * CHUNK_TOKENS + first + count)
        assert covered == list(range(start, end)), (start, end)
        assert len(segs) == len(chunks)
