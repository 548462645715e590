"""The runc-exec wrapper the daemon runs for every exec process; see README.md here.

The daemon runs :func:`command` (then the wrapper's own arguments): the C wrapper
``embedshim-runc-exec`` (``runc_exec.c``, the same command line and protocol, no interpreter to
start) where it is built, else the Python script.

The script is not a module to import: run it as
``[sys.executable, "-S", "-E", fast_script(), ...]`` (or with SCRIPT).  A script given by its
``.py`` path is compiled on every run (its bytecode is never cached), which is most of the
wrapper's own start-up; Python runs a ``.pyc`` given in its place the same way, minus that.
"""

import importlib.util
import os
import py_compile
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runc_exec.py")
BINARY_NAME = "embedshim-runc-exec"


def binary() -> str | None:
    """The compiled wrapper: in the package's ``shim/data`` (a wheel), else beside SCRIPT
    (a checkout, ``make -C runc_exec``); None if neither is there."""
    from shim import packaged

    for path in packaged.runc_exec_candidates():
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def command() -> list[str]:
    """The wrapper's argv before its options: the C binary if built, else the script."""
    path = binary()
    if path is not None:
        return [path]
    return [sys.executable, "-S", "-E", fast_script()]


def compile_script(cfile: str) -> str:
    """Compile SCRIPT to ``cfile`` (atomically, for this interpreter) and return ``cfile``.

    Run the result with the same interpreter that compiled it: another Python version
    rejects it (bad magic number) rather than running stale code.
    """
    py_compile.compile(SCRIPT, cfile=cfile, doraise=True)
    return cfile


def fast_script() -> str:
    """SCRIPT's cached ``.pyc`` (brought up to date first), or SCRIPT if it cannot be written.

    A ``.pyc`` run as a script is not checked against its source, hence the check here.
    """
    cfile = importlib.util.cache_from_source(SCRIPT)
    try:
        if not _is_fresh(cfile):
            compile_script(cfile)
        return cfile
    except (OSError, py_compile.PyCompileError):
        return SCRIPT


def _is_fresh(cfile: str) -> bool:
    """Whether ``cfile`` is this interpreter's timestamp-checked bytecode of SCRIPT as it is."""
    try:
        with open(cfile, "rb") as f:
            header = f.read(16)
        st = os.stat(SCRIPT)
    except OSError:
        return False
    return (
        len(header) == 16
        and header[:4] == importlib.util.MAGIC_NUMBER
        and int.from_bytes(header[4:8], "little") == 0
        and int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
        and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF
    )
