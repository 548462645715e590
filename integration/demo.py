"""``python -m integration.demo`` (``make demo``): real containers through embedshim.

By default it starts a private containerd (everything in one ``/tmp/esh-*`` dir, the daemon's
BPF pins in ``/sys/fs/bpf/esh-*``; both removed at the end) and shows, step by step:

1. ``ctr run --runtime io.containerd.embed.v1 ... demo sh -c 'echo hi; exit 7'``: output, exit code
2. the ``ctr events`` a subscriber saw for that container (create, start, exit, delete)
3. five detached ``sleep`` containers served by ONE daemon process: ``ps``, its RSS, ``ctr task ls``
4. ``ctr task kill -s KILL`` on one of them: exit status 137
5. the tail of the daemon's log
6. cleanup of everything

Every step checks its result; the exit status is non-zero if any check failed, so the demo
doubles as a smoke test.

``--address /run/containerd/containerd.sock`` runs the same steps against a containerd you
already run (``containerd-shim-embed-v1`` must be on its PATH: ``make setup`` links it into
/usr/local/bin).  The demo then uses its own namespace (``embedshim-demo``), labels its
containers, and removes only those; your containerd keeps running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from integration.harness import (
    EMBED_RUNTIME,
    Containerd,
    CtrError,
    HarnessError,
    busybox_rootfs,
    parse_event,
    task_list,
    wait_for,
)
from shim.oci import piddir
from shim.oci.bundle import ROOTS_ENV as BUNDLE_ROOTS_ENV
from shim.util.paths import DEFAULT_BPF_ROOT, DaemonPaths

NAMESPACE = "embedshim-demo"
LABEL = "io.embedshim.demo"
SHIM = "containerd-shim-embed-v1"
FIRST = "demo"
SLEEPERS = [f"demo-sleep-{i}" for i in range(1, 6)]
VICTIM = SLEEPERS[-1]
LOG_TAIL = 15
BPFFS = "/sys/fs/bpf"
#: seconds an idle daemon of the private containerd lingers (EMBEDSHIM_IDLE_EXIT; default 10)
IDLE_EXIT = 1
#: containerd-shim-runc-v2's resident memory per container (containerd 1.6, runc 1.1)
RUNC_SHIM_RSS = "~8-10 MB"


class StepFailed(Exception):
    """A step cannot go on (its later checks would be meaningless)."""


@dataclass
class Check:
    step: str
    what: str
    ok: bool
    detail: str = ""


@dataclass
class Events:
    """A ``ctr events`` subscriber, read by a thread."""

    proc: subprocess.Popen[str]
    namespace: str = NAMESPACE
    lines: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        out = self.proc.stdout
        assert out is not None
        self.thread = threading.Thread(
            target=lambda: self.lines.extend(iter(out.readline, "")), daemon=True
        )
        self.thread.start()

    def of(self, cid: str) -> list[tuple[str, dict[str, object], str]]:
        """(topic, payload, raw line) of every event about container ``cid``."""
        out = []
        for line in list(self.lines):
            ev = parse_event(line)
            if ev is None or ev[0] != self.namespace:
                continue
            try:
                payload = json.loads(ev[2]) if ev[2] else {}
            except ValueError:
                continue
            if isinstance(payload, dict) and cid in (
                payload.get("container_id"),
                payload.get("id"),
            ):
                out.append((ev[1], payload, line.rstrip("\n")))
        return out

    def wait_for(self, cid: str, topic: str, timeout: float = 10.0) -> dict[str, object] | None:
        try:
            return wait_for(
                lambda: next((p for t, p, _ in self.of(cid) if t == topic), None),
                timeout,
                what=f"{topic} for {cid}",
            )
        except HarnessError:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.thread is not None:
            self.thread.join(5)


# --------------------------------------------------------------------------------------
# small /proc helpers


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2 :].split()[1])


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def daemons_for(address: str) -> list[int]:
    """Live ``containerd-shim-embed-v1 ... daemon`` processes started for ``address``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        argv = cmdline(int(name))
        if (
            argv
            and any(os.path.basename(a) == SHIM for a in argv[:3])  # [python, -SE,] script
            and argv[-1] == "daemon"
            and _flag(argv, "address") == address
            and alive(int(name))
        ):
            found.append(int(name))
    return found


def _environ_has(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(v.startswith(name.encode() + b"=") for v in f.read().split(b"\0"))
    except OSError:
        return False


def _flag(argv: Sequence[str], name: str) -> str:
    for i, a in enumerate(argv):
        if a.lstrip("-") == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.lstrip("-").startswith(name + "="):
            return a.split("=", 1)[1]
    return ""


# --------------------------------------------------------------------------------------
# the demo


class Demo:
    def __init__(self, ctrd: Containerd, private: bool, rootfs: str) -> None:
        self.c = ctrd
        self.private = private
        self.rootfs = rootfs
        self.checks: list[Check] = []
        self.step = ""
        self.events: Events | None = None
        self.daemon_pid = 0
        self.daemon_dir = ""
        self.created: list[str] = []  # still to remove
        self.made: set[str] = set()  # every container the demo made or removed
        self.timings: list[tuple[str, float]] = []
        self._step_t0 = time.monotonic()

    # -- output -------------------------------------------------------------------

    def heading(self, title: str) -> None:
        self._end_step()
        self.step = title
        self._step_t0 = time.monotonic()
        print(f"\n=== {title} " + "=" * max(3, 86 - len(title)), flush=True)

    def _end_step(self) -> None:
        if self.step:
            self.timings.append((self.step, time.monotonic() - self._step_t0))

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        self.checks.append(Check(self.step, what, ok, detail))
        mark = "ok  " if ok else "FAIL"
        print(f"  [{mark}] {what}" + (f": {detail}" if detail and not ok else ""), flush=True)
        return ok

    def show(self, text: str, indent: str = "    ") -> None:
        for line in text.rstrip("\n").splitlines():
            print(indent + line)
        sys.stdout.flush()

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr, echoing the command (without the connection flags)."""
        print(f"  $ ctr {shlex.join(args)}", flush=True)
        return self.c.ctr(*args, check=check, timeout=timeout)

    def run_args(self, cid: str, *cmd: str, detach: bool = False, rm: bool = False) -> list[str]:
        return self.c.run_args(
            EMBED_RUNTIME,
            self.rootfs,
            cid,
            *cmd,
            detach=detach,
            rm=rm,
            extra=["--label", f"{LABEL}=1"],
        )

    # -- steps ----------------------------------------------------------------------

    def preflight(self) -> None:
        """Against a user's containerd: our ids must be free, or be leftovers of ours."""
        self.heading("0. containerd")
        r = self.c.ctr("version", check=False, timeout=15)
        if r.returncode != 0:
            raise StepFailed(f"containerd at {self.c.address} does not answer:\n{r.stderr}")
        self.show(r.stdout)
        print(f"  address {self.c.address}, namespace {self.c.namespace}")
        if not self.private:
            for cid in [FIRST, *SLEEPERS]:
                info = self.c.ctr("containers", "info", cid, check=False)
                if info.returncode != 0:
                    continue
                labels = (json.loads(info.stdout).get("Labels") or {}) if info.stdout else {}
                if labels.get(LABEL) != "1":
                    raise StepFailed(
                        f"container {cid} exists in namespace {self.c.namespace} and is not the"
                        f" demo's; use another --namespace"
                    )
                print(f"  removing {cid}, left over from an earlier demo run")
                self.made.add(cid)
                self.remove(cid)

    def start_events(self) -> None:
        self.events = Events(self.c.ctr_async("events"), namespace=self.c.namespace)
        self.events.start()
        time.sleep(0.5)  # ctr has no "subscribed" signal

    def run_first(self) -> None:
        self.heading(f"1. ctr run --runtime {EMBED_RUNTIME} ... {FIRST} sh -c 'echo hi; exit 7'")
        t0 = time.monotonic()
        self.made.add(FIRST)
        r = self.ctr(*self.run_args(FIRST, "sh", "-c", "echo hi; exit 7", rm=True), check=False)
        took = time.monotonic() - t0
        print("  stdout:")
        self.show(r.stdout or "(nothing)\n")
        if r.stderr.strip():
            print("  stderr:")
            self.show(r.stderr)
        print(f"  exit code: {r.returncode}   ({took:.2f} s, container created, run and removed)")
        self.check(r.stdout == "hi\n", "the container printed 'hi'", repr(r.stdout))
        self.check(
            r.returncode == 7, "ctr run exits with the container's status 7", str(r.returncode)
        )

    def show_events(self) -> None:
        self.heading(f"2. ctr events for container {FIRST}")
        assert self.events is not None
        self.events.wait_for(FIRST, "/containers/delete")
        evs = self.events.of(FIRST)
        for _, _, line in evs:
            self.show(line)
        tasks = [(t, p) for t, p, _ in evs if t.startswith("/tasks/")]
        topics = [t for t, _ in tasks]
        want = ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        self.check(
            topics == want,
            "task events create, start, exit, delete, once each, in order",
            str(topics),
        )
        for t, p in tasks:
            if t in ("/tasks/exit", "/tasks/delete"):
                status = p.get("exit_status")
                self.check(status == 7, f"{t} carries exit_status 7", str(status))

    def run_sleepers(self) -> None:
        self.heading(f"3. {len(SLEEPERS)} detached containers, one daemon")
        for cid in SLEEPERS:
            self.ctr(*self.run_args(cid, "sleep", "3600", detach=True))
            self.created.append(cid)
            self.made.add(cid)
        tasks = task_list(self.c)
        running = {cid: tasks.get(cid, (0, "missing")) for cid in SLEEPERS}
        self.check(
            all(st == "RUNNING" and pid > 0 for pid, st in running.values()),
            f"all {len(SLEEPERS)} tasks RUNNING",
            str(running),
        )
        pids = [pid for pid, _ in running.values() if pid > 0]
        parents = {ppid_of(pid) for pid in pids if alive(pid)}
        daemons = daemons_for(self.c.address)
        self.check(
            len(daemons) == 1, f"exactly one {SHIM} daemon for this containerd", str(daemons)
        )
        self.check(
            len(parents) == 1 and parents == set(daemons),
            "every container's init is a child of that daemon",
            f"parents {sorted(parents)}, daemons {daemons}",
        )
        if not daemons:
            raise StepFailed("no daemon process found")
        self.daemon_pid = daemons[0]
        self.daemon_dir = os.readlink(f"/proc/{self.daemon_pid}/cwd")
        if self.private:
            want = DaemonPaths.for_containerd(self.c.address, root=self.c.embedshim_root).dir
            self.check(self.daemon_dir == want, f"daemon files in {want}", self.daemon_dir)
        state = _flag(cmdline(self.daemon_pid), "containerd-state")
        print(f"  it takes bundles from containerd's state directory {state or '(not told)'}")
        if self.private:
            self.check(
                state == self.c.state and not _environ_has(self.daemon_pid, BUNDLE_ROOTS_ENV),
                f"it learned containerd's (non-default) state directory {self.c.state}"
                f" from the bundle, with no {BUNDLE_ROOTS_ENV}",
                state,
            )
        try:
            with open(os.path.join(self.daemon_dir, "daemon.pid")) as f:
                pidfile = f.read().strip()
        except OSError as exc:
            pidfile = repr(exc)
        self.check(pidfile == str(self.daemon_pid), "daemon.pid names it", pidfile)
        print()
        r = subprocess.run(
            [
                "ps",
                "-o",
                "pid,ppid,rss,etime,args",
                "-p",
                ",".join(map(str, [self.daemon_pid, *pids])),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        self.show(r.stdout)
        rss = rss_kib(self.daemon_pid) / 1024
        n = len(pids)
        print(
            f"\n  one daemon (pid {self.daemon_pid}) serves {n} containers:"
            f" RSS {rss:.1f} MB in all, {rss / max(1, n):.1f} MB per container;"
            f"\n  containerd-shim-runc-v2 would be {n} processes of {RUNC_SHIM_RSS} RSS each."
        )
        print()
        self.show(self.ctr("task", "ls").stdout)

    def kill_one(self) -> None:
        self.heading(f"4. ctr task kill -s KILL {VICTIM}")
        assert self.events is not None
        self.ctr("task", "kill", "-s", "KILL", VICTIM)
        try:
            wait_for(lambda: task_list(self.c).get(VICTIM, (0, ""))[1] == "STOPPED", 10)
            stopped = True
        except HarnessError:
            stopped = False
        self.check(stopped, f"{VICTIM} is STOPPED", str(task_list(self.c).get(VICTIM)))
        ev = self.events.wait_for(VICTIM, "/tasks/exit")
        status = ev.get("exit_status") if ev else None
        self.show(
            "/tasks/exit " + json.dumps(ev, separators=(",", ":"))
            if ev
            else "(no /tasks/exit event)"
        )
        self.check(status == 137, "its exit status is 137 (128 + SIGKILL)", str(status))
        r = self.ctr("task", "delete", VICTIM, check=False)
        self.show((r.stdout + r.stderr) or "(no output)\n")
        self.check(
            r.returncode == 0 and "137" in r.stderr,
            "ctr task delete reports exit code 137",
            f"rc {r.returncode}: {r.stderr.strip()}",
        )
        self.ctr("containers", "delete", VICTIM)
        self.created.remove(VICTIM)
        others = task_list(self.c)
        self.check(
            all(others.get(cid, (0, ""))[1] == "RUNNING" for cid in self.created),
            "the other containers are still RUNNING",
            str(others),
        )

    def log_tail(self) -> None:
        path = os.path.join(self.daemon_dir, "daemon.log")
        self.heading(f"5. daemon log (tail): {path}")
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError as exc:
            self.check(False, "daemon log readable", repr(exc))
            return
        head = [
            ln for ln in lines[: len(lines) - LOG_TAIL] if "BPF" in ln or "daemon started" in ln
        ]
        self.show("\n".join([*head[-2:], *(["..."] if head else []), *lines[-LOG_TAIL:]]))
        bpf = next((ln for ln in reversed(lines) if "BPF exit tracking" in ln), "")
        print(
            "  BPF exit tracking: "
            + (
                "on"
                if "tracking on" in bpf
                else "off (pidfd + reaper only)"
                if bpf
                else "not reported"
            )
        )
        self.check(
            any(f"id={VICTIM}" in ln and "exit_status=137" in ln for ln in lines),
            f"the log records {VICTIM}'s exit 137",
        )
        self.check(
            not any("level=error" in ln for ln in lines),
            "no errors in the log",
            next((ln for ln in lines if "level=error" in ln), ""),
        )

    def remove(self, cid: str) -> None:
        self.c.ctr("task", "kill", "-s", "KILL", cid, check=False)
        try:
            wait_for(lambda: task_list(self.c).get(cid, (0, "STOPPED"))[1] == "STOPPED", 10)
        except HarnessError:
            pass
        self.c.ctr("task", "delete", cid, check=False)
        self.c.ctr("c", "rm", cid, check=False)

    def teardown(self) -> None:
        self.heading("6. cleanup")
        try:
            self._teardown()
        except (CtrError, HarnessError, subprocess.TimeoutExpired, OSError) as exc:
            self.check(False, "cleanup through ctr", str(exc))
        finally:
            if self.events is not None:
                self.events.stop()

    def _teardown(self) -> None:
        for cid in list(self.created):
            print(f"  $ ctr task kill -s KILL {cid}; ctr task delete {cid}; ctr c rm {cid}")
            self.remove(cid)
            self.created.remove(cid)
        left = self.c.ctr("containers", "ls", "-q").stdout.split()
        ours = sorted(cid for cid in self.made if cid in left)
        self.check(not ours, "the demo's containers are gone", str(ours))
        if self.private and self.daemon_pid:
            gone = _wait(lambda: not alive(self.daemon_pid), IDLE_EXIT + 10)
            self.check(
                gone,
                f"the daemon (pid {self.daemon_pid}) exited once it served no task"
                f" (after EMBEDSHIM_IDLE_EXIT={IDLE_EXIT} s; default 10 s)",
            )
            with contextlib.suppress(OSError):
                with open(os.path.join(self.daemon_dir, "daemon.log")) as f:
                    self.show("\n".join(f.read().splitlines()[-2:]))
        elif self.daemon_pid:
            state = "still running" if alive(self.daemon_pid) else "exited"
            print(
                f"  the daemon (pid {self.daemon_pid}) is {state}: it exits when it serves no task"
            )
        if not self.private:
            # the namespace ctr made for the demo, if nothing else is in it
            self.c.ctr("namespaces", "remove", self.c.namespace, check=False)

    def summary(self, elapsed: float) -> int:
        self._end_step()
        failed = [c for c in self.checks if not c.ok]
        print("\n" + "=" * 92)
        for title, took in self.timings:
            print(f"  {took:6.2f} s  {title.split(':')[0]}")
        if failed:
            print(f"FAILED: {len(failed)} of {len(self.checks)} checks ({elapsed:.1f} s)")
            for c in failed:
                print(f"  {c.step}: {c.what}" + (f": {c.detail}" if c.detail else ""))
            return 1
        print(f"demo OK: {len(self.checks)} checks passed in {elapsed:.1f} s")
        return 0


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    try:
        wait_for(cond, timeout)
    except HarnessError:
        return False
    return True


def _preconditions() -> str | None:
    if os.geteuid() != 0:
        return "the demo needs root (containerd, runc, mounts, cgroups)"
    missing = [b for b in ("containerd", "ctr", "runc") if shutil.which(b) is None]
    if missing:
        return f"missing on PATH: {', '.join(missing)} (run `make setup`)"
    if not os.access("/bin/busybox", os.X_OK):
        return "missing /bin/busybox (apt-get install busybox-static; `make setup` does it)"
    return None


def _private_containerd(namespace: str) -> Containerd:
    """A private containerd whose daemon keeps its files in the temp dir, pins its BPF
    objects in a bpffs dir of this run only, and exits soon after its last task."""
    ctrd = Containerd(start=False, namespace=namespace)
    ctrd.env.update(
        {
            "EMBEDSHIM_ROOT": ctrd.embedshim_root,
            "EMBEDSHIM_BPF_ROOT": bpf_root(ctrd),
            "EMBEDSHIM_IDLE_EXIT": str(IDLE_EXIT),
        }
    )
    try:
        ctrd.start()
    except BaseException:
        ctrd.cleanup()
        raise
    return ctrd


def bpf_root(ctrd: Containerd) -> str:
    return os.path.join(BPFFS, os.path.basename(ctrd.tmp))


def remove_bpf_pins(root: str) -> list[str]:
    """Unpin everything under ``root`` (a bpffs dir of this run; the program detaches once
    no process holds it).  Returns what is still there."""
    from shim.exits.libbpf import is_bpffs

    if not os.path.isdir(root) or not is_bpffs(root):
        return []
    for top, dirs, files in os.walk(root, topdown=False):
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(top, name))
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(top, name))
    with contextlib.suppress(OSError):
        os.rmdir(root)
    return [root] if os.path.lexists(root) else []


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m integration.demo",
        description="Run real containers through embedshim and check every step.",
    )
    ap.add_argument(
        "--address",
        help="use the containerd at this socket (e.g. /run/containerd/containerd.sock) instead"
        " of starting a private one; only the demo's own containers are removed",
    )
    ap.add_argument("--namespace", default=NAMESPACE, help=f"(default {NAMESPACE})")
    args = ap.parse_args(argv)
    problem = _preconditions()
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    private = not args.address
    if private:
        print("starting a private containerd ...", flush=True)
        try:
            ctrd = _private_containerd(args.namespace)
        except HarnessError as exc:  # it has cleaned up after itself
            print(f"demo: {exc}", file=sys.stderr)
            return 1
    else:
        ctrd = Containerd(start=False, namespace=args.namespace)
        ctrd.address = os.path.abspath(args.address)
        for d in (ctrd.fifo_dir, ctrd.temp):
            os.makedirs(d, exist_ok=True)
    demo: Demo | None = None
    rc = 1
    try:
        rootfs = busybox_rootfs(os.path.join(ctrd.tmp, "busybox"))
        demo = Demo(ctrd, private, rootfs)
        try:
            demo.preflight()
            demo.start_events()
            demo.run_first()
            demo.show_events()
            demo.run_sleepers()
            demo.kill_one()
            demo.log_tail()
        except (StepFailed, CtrError, HarnessError, subprocess.TimeoutExpired, OSError) as exc:
            demo.check(False, "step aborted", str(exc))
        finally:
            demo.teardown()
    finally:
        what = "containerd, BPF pins, temp dir" if private else "temp dir"
        print(f"\nremoving the demo's {what} ...", flush=True)
        err = ""
        try:
            ctrd.cleanup()
        except HarnessError as exc:
            err = str(exc)
        left = {k: v for k, v in ctrd.leftovers().items() if v}
        if private:
            # this run's bpffs dir, and this instance's dir under the default root in case the
            # daemon did not honour EMBEDSHIM_BPF_ROOT (the key is unique to this temp dir)
            key = os.path.basename(DaemonPaths.for_containerd(ctrd.address, root="/").dir)
            pins = remove_bpf_pins(bpf_root(ctrd))
            pins += remove_bpf_pins(os.path.join(DEFAULT_BPF_ROOT, key))
            if pins:
                left["bpf pins"] = pins
            shm = piddir.path_for(key)  # left by a daemon killed rather than idle
            shutil.rmtree(shm, ignore_errors=True)
            if os.path.lexists(shm):
                left["pid directory"] = [shm]
        if demo is not None:
            demo.check(not err and not left, f"nothing left of {ctrd.tmp}", err or str(left))
            rc = demo.summary(time.monotonic() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
