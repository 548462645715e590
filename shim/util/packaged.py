"""The files that are not Python: the BPF objects, the keeper, the holder and the entry point.

An installed package (a wheel: ``pip install .``, ``deploy/Dockerfile``, ``deploy/install.sh
--dist``) carries both in ``shim/data/``: setup.py's build step copies the committed
``bpf/exitsnoop.bpf.o`` there and compiles ``keeper/keeper.c`` into
``shim/data/embedshim-keeper``.  A checkout (``make setup``, an editable install) has no
``shim/data``; there they are where ``make bpf`` and ``make keeper`` put them, in ``bpf/``
and ``keeper/`` beside the package.  Without either, the daemon still runs, and says so
loudly (its log, ``check``): without the object, no BPF exit tracking; without the keeper,
no crash survival.  The C entry point ``embedshim-entry`` (``entry/entry.c``,
:func:`entry`) is found the same way; ``shim.cmd.launcher`` installs it as
``containerd-shim-embed-v1``; without it the Python script is installed there.

Imported only when a daemon is about to be spawned, by ``check``, the launcher and the daemon.
"""

from __future__ import annotations

import os

import shim

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(shim.__file__ or "")), "data")
CHECKOUT = os.path.dirname(os.path.dirname(DATA_DIR))
KEEPER = "embedshim-keeper"
HOLDER = "embedshim-holder"
ENTRY = "embedshim-entry"
BPF_OBJECT = "exitsnoop.bpf.o"
WATCH_OBJECT = "watch.bpf.o"  # the `watch` stream (shim.watch.watchprobe)


def keeper_candidates() -> tuple[str, ...]:
    """Where the keeper is looked for, in order: in the package, then in the checkout."""
    return os.path.join(DATA_DIR, KEEPER), os.path.join(CHECKOUT, "keeper", KEEPER)


def keeper() -> str | None:
    """The keeper's path, or None if it is in none of :func:`keeper_candidates`."""
    for path in keeper_candidates():
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def holder() -> str | None:
    """The pod sandbox holder (``holder/holder.c``, for ``sandboxer = "shim"``): in the
    package, then in the checkout; None if neither has it."""
    for path in (os.path.join(DATA_DIR, HOLDER), os.path.join(CHECKOUT, "holder", HOLDER)):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def entry() -> str | None:
    """The C entry point (``entry/entry.c``), which the launcher installs as the program
    containerd runs: in the package, then in the checkout; None if neither has it."""
    for path in (os.path.join(DATA_DIR, ENTRY), os.path.join(CHECKOUT, "entry", ENTRY)):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def bpf_object_candidates() -> tuple[str, ...]:
    """Where the BPF object is looked for, in order: in the package, then in the checkout."""
    return os.path.join(DATA_DIR, BPF_OBJECT), os.path.join(CHECKOUT, "bpf", BPF_OBJECT)


def bpf_object() -> str:
    """The first of :func:`bpf_object_candidates` that exists (else the first: the error
    then names where an installed package should have it)."""
    candidates = bpf_object_candidates()
    return next((p for p in candidates if os.path.isfile(p)), candidates[0])


def watch_object() -> str:
    """The ``watch`` BPF object: found like :func:`bpf_object`."""
    candidates = (os.path.join(DATA_DIR, WATCH_OBJECT), os.path.join(CHECKOUT, "bpf", WATCH_OBJECT))
    return next((p for p in candidates if os.path.isfile(p)), candidates[0])


def keeper_missing() -> str:
    """What ``check`` and the daemon say when there is no keeper."""
    return (
        f"{KEEPER} not found (looked for {' and '.join(keeper_candidates())}): no crash "
        "survival, a crash of the daemon ends every task; in a checkout: make keeper"
    )
