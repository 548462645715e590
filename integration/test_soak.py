"""Leaks: many create/start/exit/delete cycles, with and without exec, through containerd.

After the cycles the daemon's descriptors, threads, BPF map entries, state store rows,
zombies, mounts, runc containers and exec files are exactly where they started, and its
memory has grown by less than a bound.  ``EMBEDSHIM_SOAK_CYCLES`` sets the number of
cycles (100 here, 1,000 in ``make soak``), two at a time; every other cycle also runs an
exec.  Containers use an image, so each cycle also mounts and unmounts an overlay rootfs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from integration.embed import RUNTIME, embedshim_env, remove_host_leftovers
from integration.harness import Containerd, task_list, wait_for
from integration.soak import Snapshot, snapshot

CYCLES = int(os.environ.get("EMBEDSHIM_SOAK_CYCLES", "100"))
#: Cycles run side by side (two cores: two at a time keeps both busy).
WORKERS = 2
WARMUP = 10
#: Memory the daemon may gain over the run: a fixed allowance for caches that settle
#: (sqlite's page cache, interned strings) plus a little per cycle.
RSS_BASE_KB = 3 * 1024
RSS_PER_CYCLE_KB = 4


def _cycle(c: Containerd, image: str, i: int) -> None:
    cid = f"soak{i}"
    code = i % 200
    if i % 2 == 0:
        r = c.run(RUNTIME, image, cid, "sh", "-c", f"exit {code}", rm=True, image=True, check=False)
        assert r.returncode == code, (cid, r.returncode, r.stderr)
        return
    c.run(RUNTIME, image, cid, "sleep", "1000", detach=True, image=True)
    r = c.ctr("task", "exec", "--exec-id", "e", cid, "sh", "-c", f"exit {code}", check=False)
    assert r.returncode == code, (cid, r.returncode, r.stderr)
    c.ctr("task", "kill", "-s", "KILL", cid)
    wait_for(lambda: task_list(c)[cid][1] == "STOPPED", what=f"{cid} STOPPED")
    r = c.ctr("task", "delete", cid)
    assert "exit code 137" in r.stderr, r.stderr
    c.ctr("container", "delete", cid)


def _settled(c: Containerd, before: Snapshot) -> Snapshot:
    """The snapshot once the asynchronous tails (containerd closing its connections,
    delete subcommands) are done; raises if the counts never return."""
    last: list[Snapshot] = []

    def same() -> bool:
        last[:] = [snapshot(c)]
        return last[0].exact() == before.exact()

    try:
        wait_for(same, timeout=30, interval=0.5, what="daemon back to its starting state")
    except Exception:
        raise AssertionError(f"leak:\nbefore {before.line()}\nafter  {last[0].line()}") from None
    return last[0]


def test_soak(busybox: str) -> None:
    c = Containerd(
        extra_env={**embedshim_env(), "EMBEDSHIM_IDLE_EXIT": "3600"}, watch_paths=[busybox]
    )
    try:
        from integration.harness import import_busybox_image

        image = import_busybox_image(c, rootfs=busybox)
        for i in range(WARMUP):
            _cycle(c, image, -1 - i)
        before = wait_for(lambda: snapshot(c), what="first snapshot")
        before = _settled(c, before)
        t0 = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda i: _cycle(c, image, i), range(CYCLES)))
        elapsed = time.monotonic() - t0
        after = _settled(c, before)
        assert task_list(c) == {}
        growth = after.rss_kb - before.rss_kb
        print(
            f"\nsoak: {CYCLES} cycles ({CYCLES // 2} with an exec, {WORKERS} at a time) "
            f"in {elapsed:.0f}s\n"
            f"  before {before.line()}\n  after  {after.line()}\n  RSS +{growth} kB"
        )
        assert growth < RSS_BASE_KB + RSS_PER_CYCLE_KB * CYCLES, growth
    finally:
        try:
            c.cleanup()
        finally:
            remove_host_leftovers(c)
