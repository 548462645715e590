"""The runc-exec wrapper the daemon runs for every exec process; see README.md here.

The wrapper is a script, not a module to import: run it as
``[sys.executable, "-S", "-E", SCRIPT, ...]``.  A script given by its ``.py`` path is compiled
on every run (its bytecode is never cached), which is most of the wrapper's start-up; a
``.pyc`` from :func:`compile_script` may be run the same way and skips that.
"""

import os
import py_compile

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runc_exec.py")


def compile_script(cfile: str) -> str:
    """Compile SCRIPT to ``cfile`` (atomically, for this interpreter) and return ``cfile``.

    Run the result with the same interpreter that compiled it: another Python version
    rejects it (bad magic number) rather than running stale code.
    """
    py_compile.compile(SCRIPT, cfile=cfile, doraise=True)
    return cfile
