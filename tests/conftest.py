"""Shared fixtures: the real hcached on temporary directories, over both IO engines."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hcache.daemon.io_engine import uring_binding_problem
from hcache.daemon.process import DaemonProcess


@pytest.fixture(params=["io_uring", "threads"])
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "io_uring" and (problem := uring_binding_problem()):
        pytest.skip(f"io_uring cannot run here: {problem}")
    return request.param


@pytest.fixture
def auto_engine() -> str:
    """The engine io_engine = "auto" picks on this machine: io_uring unless its binding cannot run here."""
    return "threads" if uring_binding_problem() else "io_uring"


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start hcached processes on dirs under tmp_path; all are killed at the end of the test."""
    started: list[DaemonProcess] = []

    def make(n_dirs: int = 1, engine: str = "auto", **kw: object) -> DaemonProcess:
        d = DaemonProcess(tmp_path / f"d{len(started)}", n_dirs=n_dirs, engine=engine, **kw)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.cleanup()


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess], engine: str) -> DaemonProcess:
    return daemon_factory(engine=engine)
