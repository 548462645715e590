"""Thin ctypes layer over the system ``libbpf.so.1`` (libbpf >= 1.0).

Only what the exit tracker needs: open/load an object file, find programs and
maps, attach, pin/unpin maps and links, re-open pins by path, map CRUD and key
iteration, object info, and a ring buffer consumer.

Error convention (libbpf >= 1.0): functions returning ``int`` return ``-errno``
on failure, functions returning a pointer return NULL and set ``errno``.  Every
failure is raised as :class:`BPFError` carrying that errno.

``ctypes`` and the shared library are loaded lazily on first use, so importing
this module (e.g. for :class:`BPFError`) costs nothing measurable.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from _thread import allocate_lock

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from collections.abc import Callable, Iterator
    from typing import Any, Self

LIBBPF_SONAME = "libbpf.so.1"

# enum libbpf_print_level
LIBBPF_WARN = 0
LIBBPF_INFO = 1
LIBBPF_DEBUG = 2

# bpf_map_update_elem flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_FS_MAGIC = 0xCAFE4A11


class BPFError(OSError):
    """A libbpf or bpf(2) failure: ``.errno`` is the errno, ``.strerror`` the message."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)

    def __str__(self) -> str:
        err = self.errno or 0
        name = _errno.errorcode.get(err, str(err))
        return f"{self.strerror} ({name}: {os.strerror(err)})"


# --------------------------------------------------------------------------
# library loading and prototypes
# --------------------------------------------------------------------------

_lock = allocate_lock()  # _thread: importing threading costs ~5 ms
_lib: ctypes.CDLL | None = None
_print_cb: Any = None  # keep the CFUNCTYPE object alive for the process lifetime
_messages: list[str] = []  # recent libbpf WARN/INFO lines (bounded)
_MAX_MESSAGES = 400


def _setup(lib: ctypes.CDLL) -> None:
    import ctypes as C

    vp, i, u32, cp = C.c_void_p, C.c_int, C.c_uint32, C.c_char_p
    protos: dict[str, tuple[Any, list[Any]]] = {
        "libbpf_set_print": (vp, [vp]),
        "bpf_object__open_file": (vp, [cp, vp]),
        "bpf_object__load": (i, [vp]),
        "bpf_object__close": (None, [vp]),
        "bpf_object__find_program_by_name": (vp, [vp, cp]),
        "bpf_object__find_map_by_name": (vp, [vp, cp]),
        "bpf_program__fd": (i, [vp]),
        "bpf_program__attach": (vp, [vp]),
        "bpf_map__fd": (i, [vp]),
        "bpf_map__pin": (i, [vp, cp]),
        "bpf_map__unpin": (i, [vp, cp]),
        "bpf_map__set_pin_path": (i, [vp, cp]),
        "bpf_link__fd": (i, [vp]),
        "bpf_link__pin": (i, [vp, cp]),
        "bpf_link__unpin": (i, [vp]),
        "bpf_link__destroy": (i, [vp]),
        "bpf_obj_get": (i, [cp]),
        "bpf_obj_pin": (i, [i, cp]),
        "bpf_obj_get_info_by_fd": (i, [i, vp, C.POINTER(u32)]),
        "bpf_prog_get_fd_by_id": (i, [u32]),
        "bpf_link_get_fd_by_id": (i, [u32]),
        "bpf_link_detach": (i, [i]),
        "bpf_map_update_elem": (i, [i, vp, vp, C.c_uint64]),
        "bpf_map_lookup_elem": (i, [i, vp, vp]),
        "bpf_map_delete_elem": (i, [i, vp]),
        "bpf_map_get_next_key": (i, [i, vp, vp]),
        "ring_buffer__new": (vp, [i, vp, vp, vp]),
        "ring_buffer__free": (None, [vp]),
        "ring_buffer__poll": (i, [vp, i]),
        "ring_buffer__consume": (i, [vp]),
        "ring_buffer__epoll_fd": (i, [vp]),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def _install_print(lib: ctypes.CDLL) -> None:
    """Route libbpf's log (default: stderr) into a bounded in-memory buffer.

    The callback gets a ``va_list``; on x86_64 and arm64 it arrives as a
    pointer, which libc ``vsnprintf`` takes as is.  Elsewhere only the format
    string is kept.
    """
    import ctypes as C

    global _print_cb
    libc = C.CDLL(None, use_errno=True)
    vsnprintf = libc.vsnprintf
    vsnprintf.restype = C.c_int
    vsnprintf.argtypes = [C.c_char_p, C.c_size_t, C.c_char_p, C.c_void_p]
    # os.uname(), not platform.machine(): the platform module costs the daemon 0.1 MB
    pass_va = os.uname().machine in ("x86_64", "aarch64", "arm64")
    # verifier logs come in big chunks: 64 KiB, made at the first WARN or INFO message
    # rather than kept by every daemon from the start
    buf = None

    def _cb(level: int, fmt: bytes | None, va: int | None) -> int:
        nonlocal buf
        if level >= LIBBPF_DEBUG or fmt is None:
            return 0
        try:
            if pass_va:
                if buf is None:
                    buf = C.create_string_buffer(64 * 1024)
                n = vsnprintf(buf, len(buf), fmt, va)
                text = buf.raw[: max(0, min(n, len(buf) - 1))].decode("utf-8", "replace")
            else:
                text = fmt.decode("utf-8", "replace")
            lines = [ln for ln in text.splitlines() if ln.strip()]
            with _lock:
                _messages.extend(lines)
                del _messages[: max(0, len(_messages) - _MAX_MESSAGES)]
        except Exception:  # never let an exception cross into C
            pass
        return 0

    _print_cb = C.CFUNCTYPE(C.c_int, C.c_int, C.c_char_p, C.c_void_p)(_cb)
    lib.libbpf_set_print(C.cast(_print_cb, C.c_void_p))


def lib() -> ctypes.CDLL:
    """The loaded ``libbpf.so.1`` (raises :class:`BPFError` ENOENT if missing)."""
    global _lib
    if _lib is not None:
        return _lib
    import ctypes as C

    with _lock:
        if _lib is None:
            try:
                loaded = C.CDLL(LIBBPF_SONAME, use_errno=True)
            except OSError as e:
                raise BPFError(_errno.ENOENT, f"cannot load {LIBBPF_SONAME}: {e}") from None
            try:
                _setup(loaded)
            except AttributeError as e:
                raise BPFError(_errno.ENOSYS, f"{LIBBPF_SONAME} too old: {e}") from None
            _lib = loaded
    # outside the lock: the callback takes it
    _install_print(_lib)
    return _lib


def messages(clear: bool = False) -> list[str]:
    """Recent libbpf WARN/INFO log lines (includes the verifier log on load failure)."""
    with _lock:
        out = list(_messages)
        if clear:
            _messages.clear()
    return out


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise BPFError(-ret, what)
    return ret


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        import ctypes as C

        err = C.get_errno() or _errno.EINVAL
        raise BPFError(err, what)
    return ptr


def _log_tail(n: int = 30) -> str:
    lines = messages()[-n:]
    return ("\n  " + "\n  ".join(lines)) if lines else ""


# --------------------------------------------------------------------------
# object files
# --------------------------------------------------------------------------


class _Owned:
    """A libbpf pointer this handle frees once: :attr:`ptr` raises EBADF after
    :meth:`close`, so a stale handle never reaches libbpf (NULL would crash us)."""

    _what = "handle"

    def __init__(self, ptr: int) -> None:
        self._ptr: int | None = ptr

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise BPFError(_errno.EBADF, f"{self._what} is closed")
        return self._ptr

    def _free(self, ptr: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._ptr is not None:
            self._free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BPFObject(_Owned):
    """A ``struct bpf_object`` opened from an ELF file."""

    def __init__(self, ptr: int, path: str) -> None:
        super().__init__(ptr)
        self.path = path
        self._what = f"BPF object {path!r}"

    @classmethod
    def open(
        cls,
        path: str,
        *,
        pin_root_path: str | None = None,
        object_name: str | None = None,
    ) -> BPFObject:
        """``bpf_object__open_file``.  Maps declared with ``LIBBPF_PIN_BY_NAME``
        are pinned under (or re-used from) ``pin_root_path`` at load time."""
        import ctypes as C

        class OpenOpts(C.Structure):
            _fields_ = [
                ("sz", C.c_size_t),
                ("object_name", C.c_char_p),
                ("relaxed_maps", C.c_bool),
                ("pin_root_path", C.c_char_p),
                ("_attach_prog_fd_stub", C.c_uint32),
                ("kconfig", C.c_char_p),
                ("btf_custom_path", C.c_char_p),
                ("kernel_log_buf", C.c_void_p),
                ("kernel_log_size", C.c_size_t),
                ("kernel_log_level", C.c_uint32),
            ]

        L = lib()
        opts = OpenOpts()
        opts.sz = C.sizeof(OpenOpts)
        if object_name is not None:
            opts.object_name = object_name.encode()
        if pin_root_path is not None:
            opts.pin_root_path = pin_root_path.encode()
        messages(clear=True)
        ptr = L.bpf_object__open_file(os.fsencode(path), C.byref(opts))
        return cls(_check_ptr(ptr, f"bpf_object__open_file({path!r}) failed{_log_tail()}"), path)

    def load(self) -> None:
        """``bpf_object__load``: CO-RE relocation, verifier, map creation/pinning."""
        messages(clear=True)
        _check(lib().bpf_object__load(self.ptr), f"loading {self.path!r} failed{_log_tail()}")

    def program(self, name: str) -> BPFProgram:
        p = lib().bpf_object__find_program_by_name(self.ptr, name.encode())
        if not p:  # passing NULL on to libbpf would crash the interpreter
            raise BPFError(_errno.ENOENT, f"no program {name!r} in {self.path!r}")
        return BPFProgram(self, p, name)

    def map(self, name: str) -> BPFMap:
        m = lib().bpf_object__find_map_by_name(self.ptr, name.encode())
        if not m:
            raise BPFError(_errno.ENOENT, f"no map {name!r} in {self.path!r}")
        return BPFMap(self, m, name)

    def _free(self, ptr: int) -> None:
        """``bpf_object__close``: closes the object's fds (pins stay)."""
        lib().bpf_object__close(ptr)


class _Part:
    """A program or map of an open :class:`BPFObject` (valid while the object is open)."""

    def __init__(self, obj: BPFObject, ptr: int, name: str) -> None:
        self._obj = obj
        self._part = ptr
        self.name = name

    @property
    def ptr(self) -> int:
        self._obj.ptr  # noqa: B018  (raises if the object was closed)
        return self._part


class BPFProgram(_Part):
    @property
    def fd(self) -> int:
        return _check(lib().bpf_program__fd(self.ptr), f"program {self.name!r} not loaded")

    def attach(self) -> BPFLink:
        """``bpf_program__attach`` (auto-attach from the ELF section name)."""
        ptr = lib().bpf_program__attach(self.ptr)
        return BPFLink(_check_ptr(ptr, f"attaching {self.name!r} failed{_log_tail(10)}"))


class BPFMap(_Part):
    @property
    def fd(self) -> int:
        return _check(lib().bpf_map__fd(self.ptr), f"map {self.name!r} not created")

    def pin(self, path: str) -> None:
        _check(lib().bpf_map__pin(self.ptr, os.fsencode(path)), f"pinning {self.name!r}")

    def unpin(self, path: str | None = None) -> None:
        p = os.fsencode(path) if path is not None else None
        _check(lib().bpf_map__unpin(self.ptr, p), f"unpinning {self.name!r}")

    def set_pin_path(self, path: str | None) -> None:
        """Before load: where to pin/re-use this map; ``None`` disables pinning."""
        p = os.fsencode(path) if path is not None else None
        _check(lib().bpf_map__set_pin_path(self.ptr, p), f"set_pin_path {self.name!r}")


class BPFLink(_Owned):
    """A ``struct bpf_link``.  Closing (destroying) it only closes the fd: a pinned
    link stays attached until its last pin and fd are gone."""

    _what = "BPF link"

    @property
    def fd(self) -> int:
        return _check(lib().bpf_link__fd(self.ptr), "bpf_link__fd")

    def pin(self, path: str) -> None:
        """``bpf_link__pin`` (bpffs names must not contain dots)."""
        _check(lib().bpf_link__pin(self.ptr, os.fsencode(path)), f"pinning link at {path!r}")

    def unpin(self) -> None:
        _check(lib().bpf_link__unpin(self.ptr), "unpinning link")

    def _free(self, ptr: int) -> None:
        lib().bpf_link__destroy(ptr)


# --------------------------------------------------------------------------
# fd-level operations (work on pinned objects without an object file)
# --------------------------------------------------------------------------


def obj_get(path: str) -> int:
    """``bpf_obj_get``: a new fd for the object pinned at ``path``."""
    return _check(lib().bpf_obj_get(os.fsencode(path)), f"bpf_obj_get({path!r})")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin({path!r})")


def unpin(path: str) -> None:
    """Remove a pin (the object lives on while other pins or fds refer to it)."""
    try:
        os.unlink(path)
    except OSError as e:
        raise BPFError(e.errno or _errno.EIO, f"unpinning {path!r}") from None


def close(fd: int) -> None:
    os.close(fd)


def obj_info(fd: int, size: int = 256) -> bytes:
    """Raw ``bpf_obj_get_info_by_fd`` bytes (zero-padded to ``size``)."""
    import ctypes as C

    buf = C.create_string_buffer(size)
    n = C.c_uint32(size)
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, C.byref(n)), "bpf_obj_get_info_by_fd")
    return buf.raw


def link_info(fd: int) -> tuple[int, int, int]:
    """``(link type, link id, prog id)`` of a link fd (``struct bpf_link_info``)."""
    t, link_id, prog_id = struct.unpack_from("=III", obj_info(fd))
    return t, link_id, prog_id


def prog_get_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")


def link_get_fd_by_id(link_id: int) -> int:
    return _check(lib().bpf_link_get_fd_by_id(link_id), f"bpf_link_get_fd_by_id({link_id})")


def link_detach(link_fd: int) -> None:
    """``bpf_link_detach`` (BPF_LINK_DETACH); not every link type supports it."""
    _check(lib().bpf_link_detach(link_fd), "bpf_link_detach")


def prog_name(prog_fd: int) -> str:
    """``struct bpf_prog_info.name`` (offset 64, 16 bytes)."""
    return obj_info(prog_fd)[64:80].split(b"\0", 1)[0].decode()


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(fd, key, value, flags), "bpf_map_update_elem")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    import ctypes as C

    buf = C.create_string_buffer(value_size)
    ret = lib().bpf_map_lookup_elem(fd, key, buf)
    if ret == -_errno.ENOENT:
        return None
    _check(ret, "bpf_map_lookup_elem")
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False if it was not there."""
    ret = lib().bpf_map_delete_elem(fd, key)
    if ret == -_errno.ENOENT:
        return False
    _check(ret, "bpf_map_delete_elem")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """All keys via ``bpf_map_get_next_key``.  Deleting the current key while
    iterating is fine (a hash map then restarts from its first key, so a key
    may be seen twice under concurrent deletion; callers de-duplicate)."""
    import ctypes as C

    L = lib()
    cur: bytes | None = None
    nxt = C.create_string_buffer(key_size)
    while True:
        ret = L.bpf_map_get_next_key(fd, cur, nxt)
        if ret == -_errno.ENOENT:
            return
        _check(ret, "bpf_map_get_next_key")
        cur = nxt.raw
        yield cur


# --------------------------------------------------------------------------
# ring buffer
# --------------------------------------------------------------------------


class RingBuffer(_Owned):
    """``ring_buffer__new`` on a BPF_MAP_TYPE_RINGBUF fd.

    ``on_sample(data)`` is called from :meth:`consume`/:meth:`poll` in the
    calling thread.  The consumer position lives in the kernel map, so one
    ring has exactly one logical reader across processes.
    """

    _what = "ring buffer"

    def __init__(self, map_fd: int, on_sample: Callable[[bytes], None]) -> None:
        import ctypes as C

        self._error: BaseException | None = None

        def _cb(_ctx: int | None, data: int | None, size: int) -> int:
            try:
                on_sample(C.string_at(data, size) if data else b"")
            except BaseException as e:  # never let an exception cross into C
                self._error = e
                return -1  # stops the consume loop
            return 0

        self._cb = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_void_p, C.c_size_t)(_cb)
        ptr = lib().ring_buffer__new(map_fd, C.cast(self._cb, C.c_void_p), None, None)
        super().__init__(_check_ptr(ptr, "ring_buffer__new"))

    def epoll_fd(self) -> int:
        """An epoll fd that becomes readable when data is available."""
        return _check(lib().ring_buffer__epoll_fd(self.ptr), "ring_buffer__epoll_fd")

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def consume(self) -> int:
        """Consume everything available without blocking; returns the count."""
        ret = lib().ring_buffer__consume(self.ptr)
        self._raise_pending()
        return _check(ret, "ring_buffer__consume")

    def poll(self, timeout_ms: int) -> int:
        ret = lib().ring_buffer__poll(self.ptr, timeout_ms)
        self._raise_pending()
        if ret == -_errno.EINTR:
            return 0
        return _check(ret, "ring_buffer__poll")

    def _free(self, ptr: int) -> None:
        lib().ring_buffer__free(ptr)


# --------------------------------------------------------------------------
# bpffs
# --------------------------------------------------------------------------


def _mount_of(path: str) -> tuple[str, str]:
    """(mount point, fs type) of the mount that contains ``path``."""
    path = os.path.realpath(path)
    best, fstype = "/", ""
    with open("/proc/self/mountinfo", "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace")
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) < 5:
                continue
            mnt = fields[4].replace("\\040", " ")
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            # later lines win for the same mount point (stacked mounts)
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, right.split()[0] if right else ""
    return best, fstype


def is_bpffs(path: str) -> bool:
    return _mount_of(path)[1] == "bpf"


def ensure_bpffs(mountpoint: str = "/sys/fs/bpf") -> bool:
    """Mount bpffs at ``mountpoint`` unless it already is one.  True if mounted now."""
    if is_bpffs(mountpoint):
        return False
    import ctypes as C

    libc = C.CDLL(None, use_errno=True)
    libc.mount.argtypes = [C.c_char_p, C.c_char_p, C.c_char_p, C.c_ulong, C.c_char_p]
    libc.mount.restype = C.c_int
    os.makedirs(mountpoint, exist_ok=True)
    ms_nosuid, ms_nodev, ms_noexec = 2, 4, 8
    flags = ms_nosuid | ms_nodev | ms_noexec
    if libc.mount(b"bpf", os.fsencode(mountpoint), b"bpf", flags, b"mode=0700") != 0:
        err = C.get_errno()
        if err == _errno.EBUSY and is_bpffs(mountpoint):  # lost a race: fine
            return False
        raise BPFError(err, f"mounting bpffs at {mountpoint!r}")
    return True
