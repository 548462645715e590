"""Fixtures for integration tests: a private containerd per test, a busybox rootfs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# grpcio (the CRI and Tasks API tests) otherwise runs its fork handlers in every child the
# harness forks; a child forked while a call is in flight may restart the poller and die of
# the fds Popen closes before exec (grpc issue 43055): "containerd exited with -6 during
# startup".  We only fork to exec.  Read when grpc is first imported, so set here.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from integration.embed import Events, embed_containerd
from integration.harness import (
    Containerd,
    busybox_rootfs,
    import_busybox_image,
    reap_stale,
    remove_shared_dirs,
    shared_dirs,
)
from integration.prereq import integration_problem, missing

_HERE = Path(__file__).resolve().parent
_REQUIRED = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")


def _skip_reason() -> str | None:
    problem = integration_problem(_REQUIRED)
    return None if problem is None else missing(problem)


_SKIP = _skip_reason()


_PREEXISTING = set(shared_dirs())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs root + containerd/runc; runs a private containerd"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if _SKIP:
                item.add_marker(pytest.mark.skip(reason=_SKIP))


def pytest_sessionstart(session: pytest.Session) -> None:
    if _SKIP is None:
        reap_stale()  # dirs of harness runs that were SIGKILLed


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Drop the shared dirs this session created, if empty (rmdir fails harmlessly if another
    # run is using them).  Done once per session, not per test, to keep races with
    # concurrent runs (mkdir -p in runc/shims) unlikely.
    if _SKIP is None:
        remove_shared_dirs(_PREEXISTING)


@pytest.fixture(scope="session")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a minimal busybox rootfs (built once per session)."""
    return busybox_rootfs(str(tmp_path_factory.mktemp("busybox")))


@pytest.fixture
def containerd(busybox: str) -> Iterator[Containerd]:
    """A private containerd; everything it (and its shims/containers) made is removed after
    the test, pass or fail.  ``EMBEDSHIM_ROOT`` points into its temp dir."""
    with embed_containerd(busybox) as c:
        yield c


@pytest.fixture
def busybox_image(containerd: Containerd, busybox: str) -> str:
    """Ref of a busybox image imported into ``containerd`` (built offline)."""
    return import_busybox_image(containerd, rootfs=busybox)


@pytest.fixture
def events(containerd: Containerd) -> Iterator[Events]:
    ev = Events(containerd)
    yield ev
    ev.close()
