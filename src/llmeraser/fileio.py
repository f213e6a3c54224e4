"""Small file helpers: hashing, JSON, and atomic output folders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, obj) -> None:
    """Write through a temporary sibling and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Refuse an existing output unless overwrite, and never let it be one of the inputs."""
    out = Path(out).resolve()
    for p in inputs:
        if p is not None and Path(p).resolve() == out:
            raise InputError(f"--out {out} is also an input; choose a new folder so the input is kept intact")
    if out.exists() and not overwrite:
        raise InputError(f"output folder {out} already exists; pass --overwrite to replace it, or choose another --out")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success rename it to `out`.

    The temporary folder lives in the same parent so the final rename is atomic on one file
    system. On any exception it is removed and `out` is left as it was.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise InputError(f"output folder {out} appeared while working; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
