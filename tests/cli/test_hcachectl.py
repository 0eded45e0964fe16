"""hcachectl against the real daemon, in human and --json form, and with no daemon at all."""

import json
import re
import sqlite3
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner, Result

from hcache.cli.hcachectl import app
from hcache.client import HCacheClient
from hcache.daemon.process import DaemonProcess
from tests.e2e.data import MHA, Expected, assert_restores, geometry


def _ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hcache.cli.hcachectl", *args], capture_output=True, text=True,
                          timeout=60)


def test_status_human_and_json(daemon_factory, auto_engine):
    d = daemon_factory(n_dirs=2)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(d.socket) as c:
        c.open("s", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("s", *exp.round(100, torch.Generator().manual_seed(0)))
        c.flush()
    human = _ctl("--socket", d.socket, "status")
    assert human.returncode == 0, human.stderr
    assert f"io engine  {auto_engine}" in human.stdout
    for dd in d.data_dirs:
        assert str(dd) in human.stdout
    assert "O_DIRECT" in human.stdout and "contexts   1" in human.stdout
    js = _ctl("--socket", d.socket, "--json", "status")
    assert js.returncode == 0, js.stderr
    s = json.loads(js.stdout)
    assert s["engine"] == auto_engine and s["contexts"] == 1
    assert [x["path"] for x in s["data_dirs"]] == [str(p) for p in d.data_dirs]
    assert sum(x["used"] for x in s["data_dirs"]) > 0 and s["arena"]["dirty"] == 0


def test_daemon_not_running_exits_3_naming_the_socket(tmp_path):
    sock = str(tmp_path / "none.sock")
    for extra in ([], ["--json"]):
        r = _ctl("--socket", sock, *extra, "status")
        assert r.returncode == 3
        assert sock in r.stderr and "HCACHE_SOCKET" in r.stderr


# -- every command, human and --json, in-process against one real daemon -------------------------------
MIB = 1 << 20


def _run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _both(sock: str, *args: str) -> tuple[Result, dict]:
    """The command in human form, then with --json (before and after the command); returns human, parsed."""
    human = _run("--socket", sock, *args)
    assert human.exit_code == 0, human.output
    before, after = _run("--socket", sock, "--json", *args), _run("--socket", sock, *args, "--json")
    assert before.exit_code == 0 == after.exit_code, before.output + after.output
    assert json.loads(before.stdout).keys() == json.loads(after.stdout).keys()
    return human, json.loads(before.stdout)


@pytest.fixture
def populated(daemon_factory):
    d = daemon_factory(n_dirs=2, slab_size="1MiB", extra=["--capacity", "16MiB", "--ttl", "1h"])
    with HCacheClient(d.socket) as c:
        for i, n in enumerate((100, 200, 64)):
            exp = Expected(geometry(MHA, "float32"))
            c.open(f"c{i}", model="tiny", geometry=exp.geometry, layers=exp.layers)
            c.append(f"c{i}", *exp.round(n, torch.Generator().manual_seed(i)))
        c.flush()
        c.restore("c0", "hidden")  # c0 is now the most recently accessed
    return d


def test_df_per_data_dir_and_total(populated):
    human, js = _both(populated.socket, "df")
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["DATA", "DIR", "IO", "CAPACITY", "ALLOCATED", "USED", "FREE", "USE%", "ERRORS",
                                "STATE"]
    assert [line.split()[0] for line in lines[1:4]] == [*map(str, populated.data_dirs), "total"]
    assert "16.0 MiB" in lines[3] and "MiB" in lines[1]
    assert js["total"]["capacity"] == 16 * MIB == js["capacity_limit"]
    assert js["total"]["used"] == sum(d["used"] for d in js["data_dirs"]) > 0
    assert js["total"]["free"] == 16 * MIB - js["total"]["used"]
    assert js["ttl"] == 3600


def test_ls_most_recent_first(populated):
    human, js = _both(populated.socket, "ls")
    rows = [line.split() for line in human.stdout.splitlines()]
    assert rows[0][:5] == ["NAMESPACE", "CONTEXT", "MODEL", "TOKENS", "DURABLE"]
    assert [r[1] for r in rows[1:]] == ["c0", "c2", "c1"]
    assert rows[2][3:5] == ["64", "64"] and "KiB" in human.stdout
    assert [c["ctx"] for c in js["contexts"]] == ["c0", "c2", "c1"]
    assert {c["n_tokens"] for c in js["contexts"]} == {100, 200, 64}
    only = _run("--socket", populated.socket, "ls", "--namespace", "other")
    assert only.exit_code == 0 and only.stdout.strip() == "no contexts"


def test_show_one_context(populated):
    human, js = _both(populated.socket, "show", "c1")
    out = human.stdout
    assert "default/c1" in out and "200 (200 durable)" in out and "hidden 0-2  kv 0,2" in out
    assert re.search(r"expires +in 59m", out) and js_expiry(populated, "c1") == pytest.approx(3600, abs=5)
    assert [line.split()[:2] for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))][:2] == [
        ["0", "hidden"], ["1", "hidden"]]
    assert js["n_tokens"] == 200 and js["pinned"] is False
    assert [s["chunks"] for s in js["placement"]] == [4] * 6
    assert set(js["disk_bytes"]) == {str(p) for p in populated.data_dirs} and all(js["disk_bytes"].values())
    missing = _run("--socket", populated.socket, "show", "nope")
    assert missing.exit_code == 1 and "no context 'nope'" in missing.stderr


def js_expiry(d, name: str) -> float:
    c = json.loads(_run("--socket", d.socket, "--json", "show", name).stdout)
    return c["expires"] - c["accessed"]


def test_pin_unpin_and_evict(populated):
    sock = populated.socket
    human, js = _both(sock, "pin", "c1")
    assert human.stdout.strip() == "pinned default/c1" and js["pinned"] is True
    refused = _run("--socket", sock, "evict", "c1")
    assert refused.exit_code == 1 and "pinned" in refused.stderr
    refused = _run("--socket", sock, "--json", "evict", "c1")
    assert refused.exit_code == 1 and json.loads(refused.stdout)["error"] == "bad_request"
    human, js = _both(sock, "unpin", "c1")
    assert human.stdout.strip() == "unpinned default/c1" and js["pinned"] is False
    human = _run("--socket", sock, "evict", "c1")
    assert human.exit_code == 0 and "evicted default/c1" in human.stdout
    js = _run("--socket", sock, "--json", "evict", "c2")
    assert js.exit_code == 0
    out = json.loads(js.stdout)
    assert out["evicted"] == [["default", "c2"]] and out["freed"] > 0
    human, js = _both(sock, "evict", "--until-free", "1MiB")  # already free: nothing to evict
    assert "freed 0 B" in human.stdout and js["evicted"] == [] and js["reached"] is True
    assert [c["ctx"] for c in json.loads(_run("--socket", sock, "--json", "ls").stdout)["contexts"]] == ["c0"]


def test_evict_usage_errors_exit_2(populated):
    for args in (["evict"], ["evict", "c0", "--until-free", "1MiB"], ["evict", "--until-free", "lots"]):
        r = _run("--socket", populated.socket, *args)
        assert r.exit_code == 2, args
    r = _run("--socket", populated.socket, "--json", "evict")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"] == "usage"
    r = _run("--socket", populated.socket, "no-such-command")
    assert r.exit_code == 2


def test_rm_removes_even_a_pinned_context(populated):
    sock = populated.socket
    _run("--socket", sock, "pin", "c2")
    human = _run("--socket", sock, "rm", "c2")
    assert human.exit_code == 0 and human.stdout.strip() == "removed default/c2"
    js = _run("--socket", sock, "--json", "rm", "c1")
    assert js.exit_code == 0 and json.loads(js.stdout) == {"removed": ["default", "c1"]}
    again = _run("--socket", sock, "rm", "c1")
    assert again.exit_code == 1 and "no context 'c1'" in again.stderr


def test_flush_all_or_one(populated):
    with HCacheClient(populated.socket) as c:
        exp = Expected(geometry(MHA, "float32"))
        c.append("c2", *exp.round(10, torch.Generator().manual_seed(9)))  # committed, not durable
        assert c.stat("c2").durable_tokens == 64
        human = _run("--socket", populated.socket, "flush")
        assert human.exit_code == 0 and "flushed 3 contexts" in human.stdout
        assert c.stat("c2").durable_tokens == 74
        c.append("c2", *exp.round(5, torch.Generator().manual_seed(10)))
        js = _run("--socket", populated.socket, "--json", "flush", "c2")
        assert js.exit_code == 0 and json.loads(js.stdout) == {"durable": {"default/c2": 79}}


def test_fsck_and_rebuild_forms(populated):
    human, js = _both(populated.socket, "fsck")
    assert "checked" in human.stdout and "no problems" in human.stdout
    assert js["problems"] == [] and js["contexts"] == 3 and js["checked"] == 6 * (2 + 4 + 1)
    human = _run("--socket", populated.socket, "fsck", "--rebuild")
    assert human.exit_code == 0 and "3 contexts" in human.stdout
    js = _run("--socket", populated.socket, "--json", "fsck", "--rebuild")
    assert js.exit_code == 0 and json.loads(js.stdout) == {"contexts": 3, "chunks": 42, "tokens": 364}


def test_stats(populated):
    human, js = _both(populated.socket, "stats")
    names = {fam["name"] for fam in js["metrics"]}
    assert {"hcache_saved_bytes", "hcache_chunk_reads", "hcache_restore_latency_seconds", "hcache_evictions",
            "hcache_io_engine_info", "hcache_data_dir_used_bytes"} <= names
    assert "hcache_saved_bytes_total" in human.stdout and "hcache_restore_latency_seconds p99" in human.stdout
    row = next(line for line in human.stdout.splitlines() if line.startswith("hcache_chunk_reads_total"))
    assert row.split()[1] in ("source=arena", "source=disk")


def test_status_shows_capacity_and_evictions(populated):
    human, js = _both(populated.socket, "status")
    assert "capacity   16.0 MiB" in human.stdout and "evictions  0" in human.stdout and "ttl 1h" in human.stdout
    assert js["capacity"] == 16 * MIB and js["evictions"] == {"capacity": 0, "ttl": 0, "manual": 0}


# -- shared prefixes: "a" holds 130 tokens, "b" was forked from its first 128 (its 2 full chunk rows) ------------
STREAMS = 3 + 2 + 1  # hidden layers 0-2, kv layers 0 and 2, the token ids


@pytest.fixture
def shared(daemon_factory, auto_engine) -> tuple[DaemonProcess, Expected]:
    d = daemon_factory(n_dirs=2, engine=auto_engine)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(d.socket) as c:
        c.open("a", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("a", *exp.round(130, torch.Generator().manual_seed(0)))
        c.flush()
        c.fork("a", "b", 128)
    return d, exp


def test_status_and_df_show_the_sharing_ratio(shared):
    d, _ = shared
    human, s = _both(d.socket, "status")
    assert s["logical"] > s["used"] > 0  # a's 3 chunk rows and b's 2, stored in fewer bytes
    assert s["sharing_ratio"] == round(s["logical"] / s["used"], 2) > 1
    shown = re.search(r"^sharing +(\d+\.\d)x: contexts hold ", human.stdout, re.M)
    assert shown and float(shown[1]) == pytest.approx(s["sharing_ratio"], abs=0.05)
    human, df = _both(d.socket, "df")
    assert df["total"]["logical"] == s["logical"] and df["total"]["sharing_ratio"] == s["sharing_ratio"]
    assert re.search(rf"^sharing +{shown[1]}x", human.stdout, re.M)
    assert _run("--socket", d.socket, "rm", "b").exit_code == 0  # a's chunks stay; b's own token ids go
    after = json.loads(_run("--socket", d.socket, "--json", "status").stdout)
    assert after["logical"] * 5 == s["logical"] * 3 and after["used"] < s["used"]
    assert _run("--socket", d.socket, "rm", "a").exit_code == 0
    human, empty = _both(d.socket, "df")
    assert empty["total"]["logical"] == 0 and empty["total"]["sharing_ratio"] is None
    assert re.search(r"^sharing +-: ", human.stdout, re.M)


def test_show_counts_the_shared_chunks_of_each_stream(shared):
    d, _ = shared
    human, js = _both(d.socket, "show", "b")
    assert js["share"] is True and re.search(r"^shares +yes", human.stdout, re.M)
    assert [(s["rep"], s["chunks"], s["shared"]) for s in js["placement"]] == [("hidden", 2, 2)] * 3 + [
        ("kv", 2, 2)] * 2 + [("tokens", 2, 0)]  # the token ids are each context's own
    lines = human.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["LAYER"])
    assert lines[head].split() == ["LAYER", "REP", "CHUNKS", "SHARED", "ON", "DISK", "IN", "ARENA", "DIRTY"]
    assert [line.split()[1:4] for line in lines[head + 1 : head + 1 + STREAMS]] == [["hidden", "2", "2"]] * 3 + [
        ["kv", "2", "2"]] * 2 + [["tokens", "2", "0"]]
    _, a = _both(d.socket, "show", "a")
    assert [s["shared"] for s in a["placement"]] == [2] * 5 + [0]  # its third, partial chunk is its own


def test_fsck_checks_the_index_reference_counts(shared):
    d, _ = shared
    human, js = _both(d.socket, "fsck")
    assert "no problems" in human.stdout and "index: 20 chunks (10 shared by several contexts), 0 leaked, 0 " \
                                                    "dangling" in human.stdout
    assert js["problems"] == [] and (js["chunks_indexed"], js["shared"], js["leaked"], js["dangling"]) == (
        3 * STREAMS + 2, 2 * (STREAMS - 1), 0, 0)  # a's chunks and b's 2 token id chunks; b shares the rest
    with sqlite3.connect(d.state_dir / "index.sqlite") as db:  # count one more reference than there is
        db.execute("UPDATE chunks SET refs = refs + 1 WHERE rowid = (SELECT MIN(rowid) FROM chunks)")
    human = _run("--socket", d.socket, "fsck")
    assert human.exit_code == 1 and "1 leaked, 0 dangling" in human.stdout and "fsck --rebuild" in human.stdout
    js = _run("--socket", d.socket, "--json", "fsck")
    assert js.exit_code == 1 and json.loads(js.stdout)["leaked"] == 1
    assert _run("--socket", d.socket, "fsck", "--rebuild").exit_code == 0
    human = _run("--socket", d.socket, "fsck")
    assert human.exit_code == 0 and "0 leaked, 0 dangling" in human.stdout, human.output


def test_fork_and_truncate(shared):
    d, exp = shared
    sock = d.socket
    human = _run("--socket", sock, "fork", "a", "c", "--tokens", "100")
    assert human.exit_code == 0 and human.stdout.strip() == "forked default/a into default/c: 100 tokens"
    js = _run("--socket", sock, "--json", "fork", "b", "d", "-t", "64")
    assert js.exit_code == 0
    assert {k: json.loads(js.stdout)[k] for k in ("ctx", "n_tokens", "share")} == {"ctx": "d", "n_tokens": 64,
                                                                                   "share": True}
    human = _run("--socket", sock, "truncate", "a", "--tokens", "64")
    assert human.exit_code == 0 and human.stdout.strip() == "truncated default/a to 64 tokens"
    js = _run("--socket", sock, "--json", "truncate", "c", "-t", "0")
    assert js.exit_code == 0 and json.loads(js.stdout)["n_tokens"] == 0
    with HCacheClient(sock) as c:  # the contexts that shared a's chunks keep theirs
        assert_restores(c, "b", exp, 128)
        assert_restores(c, "d", exp, 64)
        assert_restores(c, "a", exp, 64)
    assert _run("--socket", sock, "fsck").exit_code == 0
    for args, code, says in ((["fork", "a", "b", "-t", "10"], 1, "exists already"),
                             (["fork", "a", "e", "-t", "65"], 1, "holds 64"),
                             (["truncate", "a", "-t", "65"], 1, "holds 64"),
                             (["fork", "nope", "e", "-t", "1"], 1, "no context 'nope'"),
                             (["fork", "a", "e", "-t", "0"], 2, "--tokens"),
                             (["fork", "a", "e"], 2, "--tokens"),
                             (["truncate", "a", "-t", "-1"], 2, "--tokens")):
        r = _run("--socket", sock, *args)
        assert r.exit_code == code and says in r.stderr, (args, r.output)
    r = _run("--socket", sock, "--json", "truncate", "a", "-t", "65")
    assert r.exit_code == 1 and json.loads(r.stdout)["error"] == "bad_request"


COMMANDS = [["status"], ["df"], ["ls"], ["show", "x"], ["evict", "x"], ["evict", "--until-free", "1GiB"],
            ["pin", "x"], ["unpin", "x"], ["rm", "x"], ["fork", "x", "y", "--tokens", "1"],
            ["truncate", "x", "--tokens", "0"], ["flush"], ["fsck"], ["fsck", "--rebuild"], ["stats"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: "-".join(a))
def test_every_command_without_a_daemon_exits_3_naming_the_socket(tmp_path, args):
    sock = str(tmp_path / "none.sock")
    human = _run("--socket", sock, *args)
    assert human.exit_code == 3 and sock in human.stderr and "HCACHE_SOCKET" in human.stderr
    js = _run("--socket", sock, "--json", *args)
    assert js.exit_code == 3
    out = json.loads(js.stdout)
    assert out["error"] == "unreachable" and sock in out["message"]


def test_the_installed_entry_point_exit_codes(tmp_path):
    assert _ctl("--socket", str(tmp_path / "none.sock"), "df").returncode == 3
    assert _ctl("evict").returncode == 2
    assert _ctl("--help").returncode == 0 and "fsck" in _ctl("--help").stdout
