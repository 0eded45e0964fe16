"""Sizes as operators write them: parse_size and format_size."""

import pytest

from hcache.layout.units import format_size, parse_size

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("1048576", MIB), (" 4096 ", 4096), ("10b", 10), ("10B", 10),
    ("64M", 64 * MIB), ("64m", 64 * MIB), ("64MiB", 64 * MIB), ("64MB", 64 * MIB), ("64 MiB", 64 * MIB),
    ("512k", 512 * KIB), ("512KiB", 512 * KIB), ("2g", 2 * GIB), ("4GiB", 4 * GIB), ("1T", TIB),
    ("1.5GiB", 3 * GIB // 2), ("0.5M", MIB // 2), ("2.25 kib", 2304),
    (123, 123), (16 * MIB, 16 * MIB),
])
def test_parse_size(text, value):
    got = parse_size(text)
    assert got == value and type(got) is int


@pytest.mark.parametrize("text", ["", " ", "abc", "M", "-1", "-1G", "1.5.2", "5 PB", "1e3", "1,000", "1 2", "GiB4",
                                  "4 GiBs", ".5G"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="not a size") as err:
        parse_size(text)
    assert repr(text) in str(err.value) and "512MiB" in str(err.value)  # names the input and an example


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (MIB, "1.0 MiB"),
    (3 * GIB // 2, "1.5 GiB"), (TIB, "1.0 TiB"), (5000 * TIB, "5000.0 TiB"), (-2048, "-2.0 KiB"),
    (128 * MIB + 0.0, "128.0 MiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("n", [0, 512, KIB, 3 * KIB // 2, 64 * MIB, 3 * GIB // 2, 7 * TIB])
def test_format_then_parse_round_trips_round_sizes(n):
    assert parse_size(format_size(n)) == n
