"""The environment the Triton server process starts with (``LD_LIBRARY_PATH`` for the Python
backend's stub and PyTriton's bundled libraries).

The Python backend's stub (``triton_python_backend_stub``) embeds libpython of the serving
interpreter's minor version, found through the dynamic linker. With a pyenv / custom-built
interpreter the system's libpython of the same minor version (or none) would be found instead;
:func:`python_backend_env` puts this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` for
the Triton server process (PyTriton passes our environment to it, :func:`environment`), so no
re-exec is needed.
"""

from __future__ import annotations

import logging
import os
import site
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG = logging.getLogger("lipsync.triton")


def python_backend_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the Triton server must start with so that its Python-backend stub embeds
    *this* interpreter's libpython (``LIBDIR`` first on ``LD_LIBRARY_PATH``), and so that
    ``tritonserver`` finds PyTriton's bundled libraries (``nvidia_pytriton.libs``, last).

    Measured here (pyenv 3.11.7, system libpython 3.11.2 in /lib): without it the stub loads the
    system's 3.11.2 library with pyenv's 3.11.7 standard library and every model fails to load
    (``'_thread.RLock' object has no attribute '_recursion_count'``); on a machine with no
    libpython3.11 at all it cannot start. With it, ``/proc/<stub>/maps`` shows pyenv's library.

    PyTriton takes an install outside site-packages (``pip install --target DIR`` +
    ``PYTHONPATH``) for an editable one and looks for its libraries in the source tree, so
    ``tritonserver`` fails with ``libcudart-….so: cannot open shared object file``; the wheel's
    ``nvidia_pytriton.libs`` beside the package is what it needs then. Such an install has a
    second problem this cannot fix (a warning says so): the stub embeds Python in isolated mode,
    ignoring PYTHONPATH, so it finds neither ``pyzmq`` nor the right ``numpy`` there.
    """
    env = dict(os.environ if environ is None else environ)
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        LOG.warning(
            "this Python (%s) has no shared libpython; Triton's Python backend needs "
            "libpython%d.%d.so of the same version (build Python with --enable-shared)",
            sys.executable, *sys.version_info[:2],
        )  # fmt: skip
    elif soname and not (Path(libdir) / soname).exists():
        LOG.warning("libpython not found at %s", Path(libdir) / soname)
    elif not parts or parts[0] != libdir:
        parts = [libdir] + [p for p in parts if p != libdir]
    libs = _pytriton_libs()
    if libs is not None and str(libs) not in parts:
        parts.append(str(libs))
    if libs is not None and not _in_site_packages(libs.parent):
        LOG.warning(
            "PyTriton is installed outside site-packages (%s): Triton's Python-backend stub "
            "ignores PYTHONPATH and will not find pyzmq or numpy < 2 there; install them into "
            "site-packages, or add a .pth file there with `import sys; sys.path.insert(0, %r)`",
            libs.parent, str(libs.parent),
        )  # fmt: skip
    if parts:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    return env


def _in_site_packages(folder: Path) -> bool:

    sites = [*site.getsitepackages(), site.getusersitepackages()]
    return any(folder == Path(p).resolve() for p in sites if p)


def _pytriton_libs() -> Path | None:
    """The wheel's ``nvidia_pytriton.libs`` folder (beside the ``pytriton`` package), if any."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    libs = Path(spec.origin).resolve().parent.parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` = ``env`` while PyTriton starts the server (it copies ``os.environ``)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
