"""Build steps pyproject.toml cannot express: the package carries its files that are not
Python (see shim/util/packaged.py), and the wheel says it is for one platform.

* ``shim/data/exitsnoop.bpf.o`` and ``watch.bpf.o``: the committed CO-RE objects, copied
  (building it needs clang, llvm and libbpf-dev, which ``make bpf`` uses; the object is
  the same bytes on every little-endian host).
* ``shim/data/embedshim-keeper``: ``keeper/keeper.c`` compiled with the C compiler (``$CC``,
  else ``cc``), statically linked where the C library allows it, so the wheel's keeper runs
  on a node whatever its C library's version; if static linking fails (no ``libc.a``) it is
  linked dynamically, and the build says so.  A build without a C compiler fails: a
  package without its keeper has no crash survival.
* ``shim/data/embedshim-holder``: ``holder/holder.c``, the process that holds a pod's
  namespaces with ``sandboxer = "shim"`` (containerd 2.x), compiled the same way.
        )
        build_keeper(
* ``shim/data/embedshim-entry``: ``entry/entry.c`` and ``entry/sha256.c``, the C entry point
  that ``python -m shim.cmd.launcher`` installs as ``containerd-shim-embed-v1``.

The wheel is then tagged ``py3-none-<platform>`` (``linux_x86_64``, ...): any Python 3
(no extension module), but only the machine type the keeper was compiled for.  An editable
install (``make setup``) builds neither: a checkout uses ``bpf/`` and ``keeper/``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-std=c11", "-O2", "-g0", "-s", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE"]


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        data = os.path.join(self.build_lib, "shim", "data")
        os.makedirs(data, exist_ok=True)
        for obj in ("exitsnoop.bpf.o", "watch.bpf.o"):
            shutil.copyfile(os.path.join(HERE, "bpf", obj), os.path.join(data, obj))
        build_keeper(
            os.path.join(HERE, "keeper", "keeper.c"), os.path.join(data, "embedshim-keeper")
        )
        build_keeper(
            os.path.join(HERE, "holder", "holder.c"), os.path.join(data, "embedshim-holder")
        )
        build_keeper(
            os.path.join(HERE, "entry", "entry.c"),
            os.path.join(data, "embedshim-entry"),
            os.path.join(HERE, "entry", "sha256.c"),
        )


def build_keeper(source: str, out: str, *more: str) -> None:
    cc = shlex.split(os.environ.get("CC", "cc"))
    tmp = out + ".tmp"
    for extra in (["-static"], []):
        argv = [*cc, *CFLAGS, *extra, "-o", tmp, source, *more]
        print(" ".join(argv))
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode == 0:
            break
        print(f"embedshim: {' '.join(argv)} failed:\n{r.stdout}{r.stderr}", file=sys.stderr)
        if extra:
            print(f"embedshim: WARNING: linking {out} dynamically", file=sys.stderr)
    else:
        raise SystemExit(f"embedshim: cannot compile {source} (a C compiler is needed)")
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)


class BdistWheel(bdist_wheel):
    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple[str, str, str]:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel})
