"""Optional C kernels for CPU hot spots, compiled on first use and loaded with ctypes.

Why: a few CPU steps (CPRD's hard-negative mining is one) are row-wise selections that PyTorch can
only express as `topk` (scalar, ~10 ns per element) or as dozens of small vectorised ops (each a few
microseconds of dispatch). A 100-line C loop does them in one pass. No build step, no new
dependency: the source lives in the package as a string, is compiled once with the system C
compiler (`$CC`, else `cc`/`gcc`/`clang`) into a per-user cache, and every caller keeps a
pure-PyTorch path that runs when no compiler is found, the build fails, or `TRANSFERLAB_NATIVE=0`.

The cache is `$TRANSFERLAB_NATIVE_CACHE`, else `~/.cache/transferlab/native`; each library's name
carries a hash of its source, flags and machine, so an edited kernel is rebuilt and never mixed
up with an old one. The build writes a temporary file and renames it, so a crash or two processes
building at once never leave a half-written library behind.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

# Portable flags on purpose (no -march=native): the cache may sit on a home directory shared by
# machines of different CPU generations.
CFLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")


def enabled() -> bool:
    return os.environ.get("TRANSFERLAB_NATIVE", "1") != "0"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cache_dir() -> Path:
    root = os.environ.get("TRANSFERLAB_NATIVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "transferlab" / "native"


@functools.cache
def load(name: str, source: str) -> ctypes.CDLL | None:
    """The compiled library for `source` (built once per machine and source), or None if unavailable.

    None is not an error: callers fall back to PyTorch. A failed build warns once with the
    compiler's message, so a broken toolchain is visible without stopping anything.
    """
    if not enabled():
        return None
    cc = _compiler()
    if cc is None:
        return None
    key = hashlib.sha256("\0".join([source, cc, *CFLAGS, platform.machine(), platform.system()]).encode())
    out = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([cc, *CFLAGS, "-o", str(lib), str(src)], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(lib, out)  # atomic: readers see no library or a whole one
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            warnings.warn(f"transferlab: could not build the C kernel {name!r} ({detail.strip()[:300]}); "
                          "using the PyTorch path (set TRANSFERLAB_NATIVE_CACHE to a writable folder if the cache is "
                          "the problem, or TRANSFERLAB_NATIVE=0 to skip the attempt)", stacklevel=2)
            return None
    try:
        return ctypes.CDLL(str(out))  # ctypes releases the GIL during the call
    except OSError as e:
        warnings.warn(f"transferlab: could not load {out} ({e}); using the PyTorch path", stacklevel=2)
        return None
