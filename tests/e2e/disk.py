"""Reading chunk images straight from a data dir's slab files, as fsck would."""

from dataclasses import dataclass
from pathlib import Path

from hcache.layout.chunks import HEADER_SIZE, ChunkFormatError, ChunkHeader


@dataclass
class OnDisk:
    header: ChunkHeader
    path: Path
    offset: int  # of the chunk image in the slab file


def scan(data_dir: Path) -> list[OnDisk]:
    """Every valid chunk header in the data dir's slabs (stale copies included)."""
    found = []
    for slab in sorted((data_dir / "slabs").glob("*/*.slab")):
        slot_size = int(slab.parent.name)
        raw = slab.read_bytes()
        for off in range(0, len(raw) - HEADER_SIZE + 1, slot_size):
            try:
                found.append(OnDisk(ChunkHeader.unpack(raw[off : off + HEADER_SIZE]), slab, off))
            except ChunkFormatError:
                continue
    return found


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
