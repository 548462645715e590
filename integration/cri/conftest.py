"""Fixtures of the CRI suite: one CRI node per containerd version (Debian's 1.6, and 2.2.7
where ../shared/containerd2 has it), every test run once per handler on each.

Starting containerd with its CRI plugin, a netns and two imported images costs about a
second, so a node is shared by the session (pytest runs every test of one node before it
starts the next); each test removes every pod it left (pass or
fail) and checks that CRI then lists no pod and no container.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from integration.cri.api import cri_api_pb2 as cri
from integration.cri.node import (
    SHIM_SANDBOXER,
    CriNode,
    cni_cache_dirs,
    drop_cni_cache,
    handlers_of,
)
from integration.embed import containerd_version_env, runtime_info_failures

_PREEXISTING = cni_cache_dirs()


VERSIONS = ("1.6", "2.2.7")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test once per containerd version and, if it takes ``handler``, per handler that
    version has (the Sandbox API handler only on 2.x)."""
    if any("cri_node" in str(m.args[:1]) for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test names its containerd version itself
    if "handler" in metafunc.fixturenames and "cri_node" in metafunc.fixturenames:
        pairs = [(v, h) for v in VERSIONS for h in handlers_of(v)]
        if "host_network" in metafunc.fixturenames:
            cases = [(v, h, n) for v, h in pairs for n in (False, True) if runs(h, n)]
            metafunc.parametrize(
                ("cri_node", "handler", "host_network"),
                cases,
                ids=[f"{v}-{h}-{'host' if n else 'pod'}-network" for v, h, n in cases],
                indirect=["cri_node", "handler"],
                scope="session",
            )
            return
        metafunc.parametrize(
            ("cri_node", "handler"),
            pairs,
            ids=[f"{v}-{h}" for v, h in pairs],
            indirect=True,
            scope="session",
        )
    elif "cri_node" in metafunc.fixturenames:
        metafunc.parametrize("cri_node", VERSIONS, indirect=True, scope="session")


def runs(handler: str, host_network: bool) -> bool:
    """Whether the suite runs a hostNetwork pod with this handler.  Not with the Sandbox API
    on containerd 2.2.7: its shim sandbox controller dereferences the pod's nil spec
    (core/runtime/v2/bundle.go:106, NewBundle, called by plugins/sandbox/controller.go:134)
    and containerd itself dies of a nil pointer panic before it calls the shim; fixed by
    containerd commit b32cecd3 ("fix: handle nil spec for hostNetwork containers"), first
    released in 2.3.0.  Such pods need the podsandbox handler on 2.2."""
    return not (host_network and handler == SHIM_SANDBOXER)


@pytest.fixture(scope="session")
def cri_node(request: pytest.FixtureRequest, busybox: str) -> Iterator[CriNode]:
    node = CriNode(busybox, env=containerd_version_env(str(request.param)))
    failed: list[str] = []
    try:
        yield node
        failed = runtime_info_failures(node.ctrd)
    finally:
        node.close()
        drop_cni_cache(_PREEXISTING)
    left = node.ctrd.leftovers()
    assert not any(left.values()), left
    # containerd 2.x asks each runtime's shim for its RuntimeInfo (-info) before its first
    # task, and logs this for every Create while that fails
    assert not failed, failed


@pytest.fixture(scope="session")
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
