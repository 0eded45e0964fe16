"""How restore() groups the layers it reads into requests."""

from hcache.client.restorer import _read_groups


def test_reads_group_consecutive_layers_of_one_method_up_to_the_bound():
    methods = ["RE", "RE", "H", "H", "H", "KV", "KV", "H"]
    assert _read_groups(methods, 2, 2) == [[2, 3], [4], [5, 6], [7]]
    assert _read_groups(methods, 2, 1) == [[2], [3], [4], [5], [6], [7]]  # large layers: one a request
    assert _read_groups(methods, 2, 99) == [[2, 3, 4], [5, 6], [7]]
    assert _read_groups(methods, 8, 4) == []  # all recomputed
