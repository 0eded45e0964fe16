"""hcached's settings: flag > HCACHE_* > TOML file > default, each with its origin; what SIGHUP may change."""

import subprocess
import sys
import tomllib
from dataclasses import fields

import pytest

from hcache.daemon.config import LIVE_KEYS, Config, reload_into
from hcache.daemon.config_sources import KEYS, ConfigError, ConfigSources, render

MIB = 1 << 20


def _file(tmp_path, text: str):
    p = tmp_path / "hcached.toml"
    p.write_text(text)
    return str(p)


def test_every_config_field_is_a_key_with_a_flag_and_a_variable():
    assert set(KEYS) == {f.name for f in fields(Config)}
    assert KEYS["dir_capacity"].flag == "--dir-capacity" and KEYS["dir_capacity"].env == "HCACHE_DIR_CAPACITY"
    assert KEYS["data_dirs"].flag == "--data-dir"


def test_flag_beats_env_beats_file_beats_default(tmp_path):
    path = _file(tmp_path, f'state_dir = "{tmp_path}"\ncapacity = "1GiB"\ndram = "64MiB"\nttl = "2h"\n'
                           'high_watermark = "90%"\n')
    env = {"HCACHE_CAPACITY": "512MiB", "HCACHE_DRAM": "32MiB"}
    r = ConfigSources({"capacity": "256MiB"}, env, path).resolve()
    c = r.config
    assert (c.capacity, c.dram, c.ttl, c.high_watermark, c.slab_size) == (256 * MIB, 32 * MIB, 7200.0, 0.9,
                                                                          Config().slab_size)
    assert r.origins["capacity"] == "flag --capacity"
    assert r.origins["dram"] == "env HCACHE_DRAM"
    assert r.origins["ttl"] == f"file {path}"
    assert r.origins["slab_size"] == "default"


def test_config_file_named_by_the_environment_and_data_dirs_as_a_path_list(tmp_path):
    path = _file(tmp_path, f'state_dir = "{tmp_path}"\n')
    r = ConfigSources({}, {"HCACHE_CONFIG": path, "HCACHE_DATA_DIRS": "/a:/b"}, None).resolve()
    assert r.path is not None and str(r.path) == path
    assert [str(d) for d in r.config.data_dirs] == ["/a", "/b"]


def test_print_config_is_toml_that_reads_back_to_the_same_values(tmp_path):
    path = _file(tmp_path, f'state_dir = "{tmp_path}"\ncapacity = "3GiB"\nttl = 60\n')
    r = ConfigSources({"data_dirs": [str(tmp_path / "d0"), str(tmp_path / "d1")]}, {}, path).resolve()
    text = render(r)
    assert "# flag --data-dir" in text and f"# file {path}" in text and "# default" in text
    again = ConfigSources({}, {}, _file(tmp_path, text)).resolve().config
    assert again == r.config


@pytest.mark.parametrize(("text", "words"), [
    ("capacity = \"lots\"", ["capacity", "not a size"]),
    ("bogus = 1", ["unknown keys", "bogus"]),
    ("low_watermark = 0.99", ["watermarks", "low"]),
    ("io_engine = \"spdk\"", ["io_engine", "auto"]),
    ("capacity = ", ["hcached.toml"]),
])
def test_bad_settings_are_refused_naming_where_they_came_from(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        ConfigSources({}, {}, _file(tmp_path, text)).resolve()
    for w in words:
        assert w in str(e.value)


def test_a_missing_config_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: create it"):
        ConfigSources({}, {}, str(tmp_path / "none.toml")).resolve()


def test_reload_applies_live_keys_and_lists_the_rest():
    running = Config(capacity=MIB * 64, ttl=0, dram=64 * MIB)
    changed, restart = reload_into(running, Config(capacity=MIB * 32, ttl=30, log_level="debug", dram=128 * MIB))
    assert changed == {"capacity": (64 * MIB, 32 * MIB), "ttl": (0, 30), "log_level": ("INFO", "DEBUG")}
    assert restart == ["dram"]
    assert running.capacity == 32 * MIB and running.dram == 64 * MIB  # dram needs a restart
    assert set(LIVE_KEYS) == {"capacity", "dir_capacity", "high_watermark", "low_watermark", "ttl", "log_level"}


def test_hcached_print_config_shows_values_and_origins(tmp_path):
    path = _file(tmp_path, 'capacity = "2GiB"\n')
    out = subprocess.run([sys.executable, "-m", "hcache.cli.hcached", "--config", path, "--state-dir", str(tmp_path),
                          "--print-config"], capture_output=True, text=True, timeout=30,
                         env={"HCACHE_TTL": "7d", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    values = tomllib.loads(out.stdout)
    assert values["capacity"] == "2GiB" and values["ttl"] == 7 * 86400 and values["state_dir"] == str(tmp_path)
    lines = {line.split("=")[0].strip(): line for line in out.stdout.splitlines()}
    assert lines["capacity"].endswith(f"# file {path}")
    assert lines["ttl"].endswith("# env HCACHE_TTL")
    assert lines["state_dir"].endswith("# flag --state-dir")
    assert not (tmp_path / "hcached.lock").exists()  # printing starts nothing


def test_hcached_refuses_a_bad_flag_with_its_name(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hcache.cli.hcached", "--state-dir", str(tmp_path), "--capacity",
                          "12 apples"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "flag --capacity" in out.stderr and "not a size" in out.stderr
