"""Chunks: 64-token pieces of one stream, their placement over data dirs and their on-disk image.

A chunk's image is a 4 KiB header followed by the payload padded to 4 KiB. The same image lives in
an arena slot and in a slab slot, so flushing and loading are single aligned transfers.
"""

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import crc32c
import msgpack

from hcache.layout.geometry import Rep

CHUNK_TOKENS = 64
BLOCK = 4096
HEADER_SIZE = BLOCK
MAGIC = b"HCACHEC1"
FORMAT_VERSION = 1

# magic, version, rep, dtype code, layer, chunk, n_tokens, payload_len, payload_crc, seq, ctx_key,
# meta_len, header_crc
_FIXED = struct.Struct("<8sHBBIIIIIQ16sII")
_DTYPE_CODES = ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int32"]


class ChunkFormatError(ValueError):
    """A chunk image on disk is not what its header or crc says."""


def align_up(n: int, to: int = BLOCK) -> int:
    return (n + to - 1) // to * to


def chunk_image_size(token_bytes: int) -> int:
    """Bytes of a full chunk image (header + padded payload) for a stream of this token size."""
    return HEADER_SIZE + align_up(CHUNK_TOKENS * token_bytes)


def data_dir_for(layer: int, chunk: int, n_dirs: int) -> int:
    """Chunk c of layer l lives on data dir (l + c) mod D, so one layer reads from every disk."""
    return (layer + chunk) % n_dirs


def chunk_range(start_token: int, end_token: int) -> range:
    """Indices of the chunks that hold tokens [start, end)."""
    if end_token <= start_token:
        return range(0)
    return range(start_token // CHUNK_TOKENS, (end_token - 1) // CHUNK_TOKENS + 1)


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """What a chunk says about itself; enough to rebuild the index from disk alone."""

    ctx_key: bytes
    layer: int
    chunk: int
    rep: Rep
    dtype: str
    n_tokens: int
    payload_len: int
    payload_crc: int
    seq: int
    meta: dict

    def pack_into(self, buf: memoryview) -> None:
        """Write this header into the first 4 KiB of buf."""
        meta = msgpack.packb(self.meta, use_bin_type=True)
        if _FIXED.size + len(meta) > HEADER_SIZE:
            raise ValueError(f"context metadata too large for a chunk header ({len(meta)} bytes)")
        fields = (MAGIC, FORMAT_VERSION, int(self.rep), _DTYPE_CODES.index(self.dtype), self.layer,
                  self.chunk, self.n_tokens, self.payload_len, self.payload_crc, self.seq,
                  self.ctx_key, len(meta))
        head = _FIXED.pack(*fields, 0)
        crc = crc32c.crc32c(meta, crc32c.crc32c(head))
        buf[: _FIXED.size] = _FIXED.pack(*fields, crc)
        buf[_FIXED.size : _FIXED.size + len(meta)] = meta
        buf[_FIXED.size + len(meta) : HEADER_SIZE] = bytes(HEADER_SIZE - _FIXED.size - len(meta))

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> "ChunkHeader":
        """Parse and check a header; raises ChunkFormatError when it is not a valid one."""
        if len(buf) < HEADER_SIZE:
            raise ChunkFormatError("short header")
        fields = _FIXED.unpack_from(buf)
        magic, version, rep, dtype_code, layer, chunk, n_tokens, payload_len, pcrc, seq, key, mlen, hcrc = fields
        if magic != MAGIC:
            raise ChunkFormatError("no chunk header here (bad magic)")
        if version != FORMAT_VERSION:
            raise ChunkFormatError(f"chunk format version {version} is not supported (this is {FORMAT_VERSION})")
        if mlen > HEADER_SIZE - _FIXED.size:
            raise ChunkFormatError("header metadata length out of range")
        meta = bytes(buf[_FIXED.size : _FIXED.size + mlen])
        if crc32c.crc32c(meta, crc32c.crc32c(_FIXED.pack(*fields[:-1], 0))) != hcrc:
            raise ChunkFormatError("header crc mismatch (torn or corrupted header)")
        try:
            rep_v = Rep(rep)
            dtype = _DTYPE_CODES[dtype_code]
        except (ValueError, IndexError):
            raise ChunkFormatError("header names an unknown representation or dtype") from None
        return cls(key, layer, chunk, rep_v, dtype, n_tokens, payload_len, pcrc, seq,
                   msgpack.unpackb(meta, raw=False))


def payload_crc(payload: memoryview | bytes) -> int:
    return crc32c.crc32c(payload)


def verify_image(image: memoryview, expect_key: bytes, layer: int, chunk: int, rep: Rep) -> ChunkHeader:
    """Check a chunk image read back from disk against its own header and where it was expected."""
    header = ChunkHeader.unpack(image[:HEADER_SIZE])
    if (header.ctx_key, header.layer, header.chunk, header.rep) != (expect_key, layer, chunk, rep):
        raise ChunkFormatError(
            f"slot holds chunk {header.chunk} of layer {header.layer}, expected chunk {chunk} of layer {layer}"
        )
    payload = image[HEADER_SIZE : HEADER_SIZE + header.payload_len]
    if len(payload) != header.payload_len or payload_crc(payload) != header.payload_crc:
        raise ChunkFormatError(f"payload crc mismatch in chunk {chunk} of layer {layer} (corrupted on disk)")
    return header


def segments(start_token: int, end_token: int) -> list[tuple[int, int, int]]:
    """Tokens [start, end) as pieces (chunk position within chunk_range, first token in that chunk, count),
    in order, so the n-th piece's tokens follow the (n-1)-th in a contiguous buffer."""
    out = []
    t = start_token
    first = start_token // CHUNK_TOKENS
    while t < end_token:
        c = t // CHUNK_TOKENS
        count = min(end_token, (c + 1) * CHUNK_TOKENS) - t
        out.append((c - first, t - c * CHUNK_TOKENS, count))
        t += count
    return out


def payload_runs(payload_offsets: list[int], start_token: int, end_token: int,
                 token_bytes: int) -> Iterator[tuple[int, int, int]]:
    """Tokens [start, end) of one stream as byte runs (offset in the arena, offset in a buffer that holds them back
    to back, length); `payload_offsets`: each chunk's payload offset, one per chunk of chunk_range(start, end)."""
    at = 0
    for pos, first, count in segments(start_token, end_token):
        yield payload_offsets[pos] + first * token_bytes, at, count * token_bytes
        at += count * token_bytes
