"""``python -m shim.cmd.launcher``: install the fast ``containerd-shim-embed-v1`` (``make setup``).

containerd runs ``containerd-shim-embed-v1 start`` for every container and ``... delete``
after every task deletion, so the interpreter's own start-up is most of their cost.  pip's
console script runs Python with ``site`` (site-packages, ``.pth`` files: about 11M
instructions) and imports ``re`` before our code runs; ``start`` and ``delete`` need neither,
only the standard library and this package.  So this writes, in place of pip's script::

    #!<venv>/bin/python -SE
    import sys
    sys.path[0] = '<the directory holding the shim package>'
    from shim.cmd.cli import main
    sys.exit(main())

(``sys.path[0]`` would be the script's own directory, the venv's bin, which holds no modules.)

``-S`` skips ``site``; ``-E`` ignores PYTHON* variables from containerd's environment (a
PYTHONPATH meant for something else must not change what the shim runs).  The other
subcommands (``daemon`` needs protobuf from site-packages) turn ``site`` on at run time:
see ``shim.cmd.cli``.  The daemon therefore shows in ``ps`` as ``<venv>/bin/python -SE
<venv>/bin/containerd-shim-embed-v1 -address ... daemon``.

``pip install`` writes its own script again; ``make setup`` (through ``shim.cmd.setupcheck``)
puts this one back, and leaves it alone when it is already there; ``deploy/install.sh`` runs
this after installing the wheel (the path entry is then the venv's site-packages).  Nothing
is written when the interpreter's path cannot go on a ``#!`` line (spaces, too long): pip's
script stays.

With the C entry point built (``entry/entry.c``: ``make setup`` builds it, the wheel carries
it, see ``shim.util.packaged``), that script goes to ``<prefix>/libexec/embedshim/`` instead, and
the program itself is installed in its place: it answers the usual ``start`` (daemon alive)
and ``delete`` (task already deleted by the daemon) with no interpreter at all, and executes
the script for everything else.  The script keeps the name ``containerd-shim-embed-v1``, so
the daemon (which ``start`` spawns through it) looks the same in ``ps``.
"""

from __future__ import annotations

import os
import sys
import sysconfig

import shim
from shim.util import packaged

NAME = "containerd-shim-embed-v1"
#: Linux reads at most 256 bytes of a ``#!`` line (BINPRM_BUF_SIZE).
_MAX_SHEBANG = 255


def script_path() -> str:
    """Where pip puts this environment's console script (the venv's bin dir)."""
    return os.path.join(sysconfig.get_path("scripts"), NAME)


def package_dir() -> str:
    """The directory that holds the ``shim`` package (the checkout, for ``pip install -e``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(shim.__file__)))


def render(python: str, path_entry: str) -> str | None:
    """The launcher's text, or None if ``python`` cannot be named on a ``#!`` line."""
    shebang = f"#!{python} -SE"
    if any(c.isspace() for c in python) or len(shebang) > _MAX_SHEBANG:
        return None
    return (
        f"{shebang}\n"
        f"# {NAME}: written by python -m shim.cmd.launcher (make setup, deploy/install.sh) in\n"
        "# place of pip's console script; no site, for a quick start.  See shim/cmd/launcher.py.\n"
        "import sys\n"
        f"sys.path[0] = {path_entry!r}\n"
        "from shim.cmd.cli import main\n"
        "sys.exit(main())\n"
    )


def python_entry(path: str) -> str:
    """Where the script goes when the C entry point is installed at ``path``:
    ``<prefix>/bin/NAME`` -> ``<prefix>/libexec/embedshim/NAME`` (entry/entry.c looks there,
    from its own /proc/self/exe)."""
    prefix = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return os.path.join(prefix, "libexec", "embedshim", NAME)


def _write(path: str, data: bytes) -> bool:
    """Put ``data`` at ``path`` (mode 0755) unless it is there already: whether it wrote."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    except OSError:
        pass
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def install(
    path: str | None = None, python: str | None = None, entry: str | None = None
) -> tuple[bool, str]:
    """Write the launcher at ``path`` unless it is already there: (ok, what happened).
    ``entry``: the C entry point to install at ``path`` with the script beside it (default
    :func:`shim.util.packaged.entry`; "" for none: the script itself at ``path``)."""
    path = path or script_path()
    text = render(python or sys.executable, package_dir())
    if text is None:
        return False, f"{path}: interpreter path unusable on a #! line; pip's script kept"
    if not os.path.exists(path):
        return False, f"{path} is missing: is the package installed in this venv?"
    program = packaged.entry() if entry is None else entry
    try:
        if not program:
            wrote = _write(path, text.encode())
            return True, f"{path} (fast launcher{' written' if wrote else ''})"
        script = python_entry(path)
        os.makedirs(os.path.dirname(script), exist_ok=True)
        wrote = _write(script, text.encode())
        with open(program, "rb") as f:
            wrote = _write(path, f.read()) or wrote
    except OSError as exc:
        return False, f"cannot write {path}: {exc}"
    return True, f"{path} (C entry point, Python's at {script}{'; written' if wrote else ''})"


def main() -> int:
    ok, text = install()
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
