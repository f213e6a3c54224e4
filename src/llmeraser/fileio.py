"""Small file helpers: hashing, JSON, decoding, and output folders that can never destroy an input.

Invariants every command's output keeps (tests/test_hostile_inputs.py):
* an output is never an input, never contains one and never lies inside one (real paths, symlinks
  followed), so no `--out` can rename, replace or write into what the user gave;
* `--overwrite` replaces only a folder that llmeraser wrote: one holding `MARKER`, whose manifest lists
  every file in it (a file the user added since makes the folder theirs again);
* the output appears all at once: it is built in `.{name}.llmeraser-tmp-*/out` beside `--out`, checked
  (every safetensors tensor finite), then renamed into place; a run that dies leaves only that
  staging folder, which the next run for the same `--out` finds unlocked and removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from .errors import InputError, NumericalError

MARKER = ".llmeraser-output.json"
STAGING = ".llmeraser-tmp-"
# a staging folder without its lock file is stale only after this long (it may be between mkdir and lock)
UNLOCKED_GRACE_S = 60.0
# output files an llmeraser version before MARKER wrote; such a folder may be overwritten
LEGACY_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "train.json", "unlearn.json",
                "baseline.json", "report.json", "report.md", "demo_summary.json", "metrics.png"}
LEGACY_META = ("unlearn.json", "train.json", "baseline.json", "report.json")

try:  # advisory locks: released by the kernel when the holder dies, even by SIGKILL
    import fcntl
except ImportError:  # pragma: no cover - Windows: staging folders are judged by age alone
    fcntl = None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def loads_json(text: str):
    """json.loads, with its two failures that are not a JSONDecodeError (an integer past Python's digit limit, nesting
    past the recursion limit) raised as one, so that a caller's one clause turns every malformed file into its message."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:
        raise json.JSONDecodeError(f"{type(e).__name__}: {str(e).splitlines()[0]}", text, 0) from None


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's contents, without a leading byte-order mark (editors on Windows write one); an unreadable
    file or an undecodable byte is an InputError naming the file (and line) and the fix."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path}: cannot be read ({e.strerror or e}); check that it is a file you may read") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{what} {path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def write_json(path: str | Path, obj) -> None:
    """Write through a temporary sibling and rename, so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text through a temporary sibling and rename, so a reader never sees half a file. The sibling's
    name is unique (process id and a random part), so two processes writing the same path do not take each other's
    temporary file; the last rename wins, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def real_path(p: str | Path) -> Path:
    """The absolute path with every symlink resolved (for a path that does not exist yet, its existing part)."""
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple = (), flag: str = "--out") -> Path:
    """The resolved output folder, after every check that can be made before any computation.

    `inputs` are the paths the command reads (files or folders; None and non-paths such as the
    aliases 'smollm2', 'gemma3-270m' are skipped). Refuses an output that is an input, contains one or lies inside an
    input folder; an existing output without `overwrite`, or one llmeraser did not write; and a
    place where no folder can be created.
    """
    shown = out
    out = real_path(out)
    for p in inputs:
        if p is None or not os.path.exists(str(p)):
            continue
        q = real_path(p)
        if q == out:
            raise InputError(f"{flag} {shown} is also an input ({p}); choose a new folder so the input is kept intact")
        if _within(q, out):
            raise InputError(f"{flag} {shown} contains the input {p}; writing or replacing it could destroy that input. "
                             f"Choose an output folder outside your inputs")
        if q.is_dir() and _within(out, q):
            raise InputError(f"{flag} {shown} lies inside the input folder {p}, which llmeraser never writes into; "
                             f"choose an output folder outside it")
    # first: a killed run's previous output, put back, is an existing output that the checks below must see, here and
    # not only when the finished computation is renamed into place (atomic_dir checks again then)
    remove_stale(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{flag} {shown} is a file, not a folder; choose a folder path")
        if not overwrite:
            raise InputError(f"output folder {shown} already exists; pass --overwrite to replace it, or choose another {flag}")
        check_replaceable(out, flag)
    _check_creatable(out, shown, flag)
    return out


def _check_creatable(out: Path, shown, flag: str) -> None:
    """Whether a folder can be made beside `out`: the nearest existing ancestor is a writable folder."""
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {shown}: {ancestor} is a file, so no folder can be made there; choose another {flag}")
    try:  # a real probe: os.access says yes to root on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".llmeraser-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{flag} {shown}: cannot write in {ancestor} ({e.strerror}); choose a writable {flag}") from None


NOT_REGULAR = "not a regular file"


def manifest(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder` but the marker; a link or anything else that is not a
    regular file (a FIFO, a socket) is listed as NOT_REGULAR, never opened: reading a FIFO would wait forever, and
    llmeraser writes only regular files, so such an entry marks a folder it may not replace."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.name == MARKER or (p.is_dir() and not p.is_symlink()):
            continue
        regular = p.is_file() and not p.is_symlink()
        out[str(p.relative_to(folder))] = sha256_file(p) if regular else NOT_REGULAR
    return out


def check_replaceable(out: Path, flag: str = "--out", shown: Path | None = None) -> None:
    """Refuse to replace `out` unless every file in it is one llmeraser wrote, unchanged since (by SHA-256)."""
    shown = shown or out
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir())
    marker = out / MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            listed = None
        if not isinstance(listed, dict):
            listed = {}
        now = manifest(out)
        changed = [f for f in files if f != MARKER and listed.get(f) != now.get(f)]
        if not changed:
            return
        raise InputError(f"--overwrite: {shown} holds {changed[0]}, which llmeraser did not write there or which changed "
                         "since" + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
                         + f"; move it out, or choose another {flag}")
    if _legacy_output(out, files):
        return
    raise InputError(f"--overwrite replaces only a folder llmeraser wrote, and {out} was not (no {MARKER} in it); "
                     f"remove it yourself if it is really to go, or choose another {flag}")


def _legacy_output(out: Path, files: list[str]) -> bool:
    """An output of an llmeraser version before MARKER: its metadata names llmeraser and every file is one it wrote."""
    if not files or any(f not in LEGACY_FILES and not re.fullmatch(r"residual_[^/]+\.png", f) for f in files):
        return False
    for name in LEGACY_META:
        try:
            meta = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        # unlearn.json, train.json, baseline.json name llmeraser; an evaluate report.json has its own keys
        if isinstance(meta, dict) and ("llmeraser" in (meta.get("versions") or {}) or
                                       (name == "report.json" and {"methods", "splits", "request_sha256"} <= set(meta))):
            return True
    return False


def remove_stale(out: Path) -> list[Path]:
    """Remove staging folders of runs for `out` that died (their lock is free); return what was removed.

    A run killed between moving the previous output aside and renaming the new one into place left
    the previous output in its staging folder as `previous`: it is put back at `out` first."""
    if out.parent.is_dir():
        for p in out.parent.glob(f"{glob_escape(f'.{out.name}.{STAGING}')}*"):
            if (p / "previous").is_dir() and not os.path.lexists(out) and _is_stale(p):
                os.rename(p / "previous", out)
    return remove_stale_in(out.parent, f".{out.name}.", (STAGING,))


def remove_stale_in(parent: Path, prefix: str, kinds: tuple[str, ...]) -> list[Path]:
    """Remove the folders `parent/{prefix}{kind}*` whose run died (see `_is_stale`)."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.glob(f"{glob_escape(prefix)}*"):
        if p.is_dir() and p.name[len(prefix):].startswith(kinds) and _is_stale(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staging_dir(parent: Path, prefix: str):
    """A new folder `parent/{prefix}*` locked for as long as this process holds it, removed on exit.

    The lock (an flock on `.lock` inside it) is what tells a later `remove_stale_in` that the run is
    alive: the kernel releases it when the process dies, SIGKILL included."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        with open(staging / ".lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _is_stale(staging: Path) -> bool:
    lock = staging / ".lock"
    try:
        young = time.time() - staging.stat().st_mtime <= UNLOCKED_GRACE_S
    except OSError:
        return False
    if lock.is_file() and lock.stat().st_size == 0 and young:
        return False  # created, perhaps not yet locked: its run may be starting
    if lock.is_file() and fcntl is not None:
        try:
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return False  # its run is alive
                fcntl.flock(f, fcntl.LOCK_UN)
                return True
        except OSError:
            return False
    return not young


def check_finite_safetensors(folder: Path) -> None:
    """Raise NumericalError if any tensor of any safetensors file under `folder` is NaN or infinite."""
    import torch
    from safetensors.torch import load_file

    for f in sorted(folder.rglob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NumericalError(f"the result has non-finite values ({name} in {f.name}); nothing was written. "
                                     "The computation diverged: lower the learning rate, or raise the damping")


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, inputs: tuple = ()):
    """Yield an empty staging folder; on success check it, record its manifest and rename it to `out`.

    The staging folder lives beside `out` (one file system, so the rename is atomic), holds a lock
    for as long as this run lives, and is removed on every exit Python sees. A folder already at
    `out` is replaced only with `overwrite` and only if `check_replaceable` allows it; it is moved
    into the staging folder first and removed with it.
    """
    out = check_output_dir(out, overwrite, inputs)
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    done = False
    try:
        with staging_dir(out.parent, f".{out.name}.{STAGING}") as staging:
            work = staging / "out"
            work.mkdir()
            yield work
            check_finite_safetensors(work)
            write_json(work / MARKER, {"written_by": "llmeraser", "files": manifest(work)})
            previous = staging / "previous"
            try:
                if os.path.lexists(out):
                    if not overwrite:
                        raise InputError(f"output folder {out} appeared while working; pass --overwrite to replace it")
                    # moved aside first and checked there, so nothing written into it after the check is lost
                    os.rename(out, previous)
                    check_replaceable(previous, shown=out)
                os.rename(work, out)
            except BaseException as e:
                # whatever stopped the swap (a failed check, a full disk, Ctrl-C): the folder there goes back as it
                # was before the staging folder, which holds it, is removed
                if previous.exists() and not os.path.lexists(out):
                    os.rename(previous, out)
                if isinstance(e, OSError):
                    raise InputError(f"could not move the result into {out} ({e.strerror}); the folder there is as "
                                     "it was, and nothing was written") from None
                raise
            done = True
    finally:
        if not done:
            for d in created:  # folders made for this output only, empty again
                with contextlib.suppress(OSError):
                    d.rmdir()
