"""Context keys: blake2b over length-prefixed parts, the same in every process and release."""

import json
import os
import subprocess
import sys

import pytest

from hcache.layout.keys import KEY_BYTES, context_key

NAMES = [("default", "chat-42"), ("ns", "ünïcode ✓"), ("", ""), ("a", "bc"), ("ab", "c"), ("x" * 300, "y")]


def test_context_key_is_16_bytes_and_pinned():
    # Stored chunk headers and the index carry these keys: a change here orphans every saved context.
    assert context_key("default", "chat-42").hex() == "26d7d7e2a48278b7d83b7e2c92c53172"
    assert context_key("ns", "ünïcode ✓").hex() == "757079e34e59da14145084bb5e16614f"
    assert all(len(context_key(ns, c)) == KEY_BYTES == 16 for ns, c in NAMES)


@pytest.mark.parametrize("seed", ["0", "1", "12345"])
def test_context_key_is_the_same_in_another_process(seed):
    code = ("import json, sys; from hcache.layout.keys import context_key; "
            "print(json.dumps([context_key(ns, c).hex() for ns, c in json.loads(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(NAMES)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": seed})
    assert json.loads(out.stdout) == [context_key(ns, c).hex() for ns, c in NAMES]


def test_context_key_separates_its_parts():
    assert context_key("a", "bc") != context_key("ab", "c")
    assert context_key("", "abc") != context_key("abc", "")
    assert context_key("a", "b") != context_key("b", "a")
    keys = {context_key(ns, c) for ns in ("", "a", "ab", "default") for c in ("", "b", "bc", "chat-1", "chat-2")}
    assert len(keys) == 4 * 5


def test_context_key_is_not_utf8_ambiguous():
    assert context_key("default", "é") != context_key("default", "e\u0301")  # NFC vs NFD: different ids
    assert context_key("default", "a\x00") != context_key("default", "a")


def test_a_content_key_names_the_whole_prefix_within_one_domain():
    from hcache.layout.keys import chunk_content_key, prefix_domain, prefix_keys

    ids = bytes(range(256)) * 3  # 192 int32 ids' worth of bytes: three chunks of 64
    d = prefix_domain("LlamaModel:abc", "default")
    keys = prefix_keys(d, ids, 256)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert keys[1] == chunk_content_key(d, keys[0], ids[256:512])
    assert prefix_keys(d, ids[:600], 256) == keys[:2]  # a partial chunk has no key
    other = prefix_keys(d, bytes(4) + ids[4:], 256)
    assert other[0] != keys[0] and other[2] != keys[2]  # a different first token changes every later key
    assert prefix_keys(prefix_domain("LlamaModel:abc", "tenant-b"), ids, 256)[0] != keys[0]
    assert prefix_keys(prefix_domain("OtherModel:abc", "default"), ids, 256)[0] != keys[0]
