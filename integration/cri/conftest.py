"""Fixtures of the CRI suite: one CRI node per containerd version (Debian's 1.6, and 2.2.7
where ../shared/containerd2 has it), every test run once per handler on each.

Starting containerd with its CRI plugin, a netns and two imported images costs about a
second, so a node is shared by the session (pytest runs every test of one node before it
starts the next); each test removes every pod it left (pass or
fail) and checks that CRI then lists no pod and no container.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from integration.cri.api import cri_api_pb2 as cri
from integration.cri.node import HANDLERS, CriNode
from integration.embed import containerd_version_env, runtime_info_failures

#: CNI's result cache (libcni's default), outside any temp dir; dropped if this run made it.
CNI_CACHE_DIRS = ("/var/lib/cni/results", "/var/lib/cni")
_PREEXISTING = {d for d in CNI_CACHE_DIRS if os.path.isdir(d)}


@pytest.fixture(scope="session", params=["1.6", "2.2.7"])
def cri_node(request: pytest.FixtureRequest, busybox: str) -> Iterator[CriNode]:
    node = CriNode(busybox, env=containerd_version_env(str(request.param)))
    failed: list[str] = []
    try:
        yield node
        failed = runtime_info_failures(node.ctrd)
    finally:
        node.close()
        for d in CNI_CACHE_DIRS:
            if d not in _PREEXISTING:
                with contextlib.suppress(OSError):
                    os.rmdir(d)
    left = node.ctrd.leftovers()
    assert not any(left.values()), left
    # containerd 2.x asks each runtime's shim for its RuntimeInfo (-info) before its first
    # task, and logs this for every Create while that fails
    assert not failed, failed


@pytest.fixture(params=list(HANDLERS))
def handler(request: pytest.FixtureRequest) -> str:
    """The runtime handler (RuntimeClass handler) the test's pods use."""
    return str(request.param)


@pytest.fixture
def node(cri_node: CriNode) -> Iterator[CriNode]:
    """The shared CRI node; pods the test left are stopped and removed afterwards."""
    yield cri_node
    left = cri_node.remove_all_pods()
    containers = cri_node.containers()
    assert not containers, f"containers left after removing pods {left}: {containers}"
    pods = cri_node.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert not pods, pods
