"""A run killed (SIGKILL) in the middle of writing its output leaves nothing where a user would take it for a
result, and the next run for the same --out recognises its staging folder as dead, removes it and starts clean."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmeraser.cli import main
from llmeraser.fileio import MARKER, STAGING, remove_stale

from helpers import write_jsonl

# run in a child process: the adapter file is written half, then the process waits to be killed
CHILD = """
import sys, time
import safetensors.torch as st

real_save = st.save_file

def half_then_wait(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:  # as if killed in the middle of the write
        f.truncate(f.seek(0, 2) // 2)
    open(sys.argv[1], "w").close()
    time.sleep(300)

st.save_file = half_then_wait
from llmeraser.cli import main
sys.exit(main(sys.argv[2:]))
"""


def args(tiny_dir, request, out):
    return ["unlearn", "--base", str(tiny_dir / "base"), "--adapter", str(tiny_dir / "adapter"),
            "--data", str(tiny_dir / "train.jsonl"), "--request", str(request), "--out", str(out),
            "--device", "cpu", "--quiet", "--allow-unconverged", "--max-iters", "5"]


def test_killed_save_leaves_no_partial_output_and_the_next_run_starts_clean(tiny_dir, tmp_path):
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "r3"}])
    out, ready = tmp_path / "edit", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), *args(tiny_dir, req, out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.time() < deadline, "the child never reached its save"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    # nothing at --out; the half-written adapter sits only in the dead run's staging folder
    assert not out.exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(f".edit.{STAGING}")]
    assert len(staging) == 1
    partial = staging[0] / "out" / "adapter_model.safetensors"
    assert partial.is_file() and partial.stat().st_size > 0
    # the next run for the same --out removes it and writes a complete output
    assert main(args(tiny_dir, req, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit", "ready", "req.jsonl"]
    listed = json.loads((out / MARKER).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if p.name != MARKER)
    from safetensors.torch import load_file
    assert load_file(str(out / "adapter_model.safetensors"))  # complete: it parses


def test_a_live_runs_staging_folder_is_left_alone(tmp_path):
    """Only a staging folder whose lock is free (its run died) is removed."""
    out = tmp_path / "edit"
    live, dead = tmp_path / f".edit.{STAGING}live", tmp_path / f".edit.{STAGING}dead"
    for d in (live, dead):
        (d / "out").mkdir(parents=True)
        (d / ".lock").write_text("123\n")  # a run writes its pid once it holds the lock
    unrelated = tmp_path / f".edit2.{STAGING}x"
    (unrelated / "out").mkdir(parents=True)
    (unrelated / ".lock").write_text("123\n")
    with open(live / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert remove_stale(out) == [dead]
    assert live.is_dir() and not dead.exists() and unrelated.is_dir()


@pytest.mark.parametrize("age, removed", [(5.0, False), (3600.0, True)])
def test_a_staging_folder_without_a_lock_is_removed_once_old(tmp_path, age, removed):
    out = tmp_path / "edit"
    d = tmp_path / f".edit.{STAGING}x"
    d.mkdir()
    os.utime(d, (time.time() - age, time.time() - age))
    assert (remove_stale(out) == [d]) is removed


def test_a_lock_file_not_yet_locked_is_left_alone(tmp_path):
    """Between creating `.lock` and locking it a run holds an empty lock file: young and empty means alive."""
    d = tmp_path / f".edit.{STAGING}starting"
    (d / "out").mkdir(parents=True)
    (d / ".lock").write_text("")
    assert remove_stale(tmp_path / "edit") == [] and d.is_dir()


def test_a_previous_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    """Killed between moving the old output aside and renaming the new one in: the old one comes back."""
    out = tmp_path / "edit"
    d = tmp_path / f".edit.{STAGING}dead"
    (d / "previous").mkdir(parents=True)
    (d / "previous" / "adapter_model.safetensors").write_text("the previous result")
    (d / ".lock").write_text("123\n")
    assert remove_stale(out) == [d]
    assert (out / "adapter_model.safetensors").read_text() == "the previous result"


def test_a_rerun_after_a_killed_swap_is_refused_before_it_computes(tmp_path):
    """The output a killed run moved aside comes back before the checks: a rerun without --overwrite is refused by
    check_output_dir, before any computation, not by the final rename after all of it."""
    from llmeraser.errors import InputError
    from llmeraser.fileio import check_output_dir

    out = tmp_path / "edit"
    d = tmp_path / f".edit.{STAGING}dead"
    (d / "previous").mkdir(parents=True)
    (d / "previous" / "adapter_model.safetensors").write_text("the previous result")
    (d / ".lock").write_text("123\n")
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        check_output_dir(out, overwrite=False)
    assert (out / "adapter_model.safetensors").read_text() == "the previous result" and not d.exists()


def test_two_writers_of_one_path_do_not_take_each_others_temporary_file(tmp_path, monkeypatch):
    """write_text_atomic while another write of the same path runs between its write and its rename (as two
    processes may): both succeed, the last rename wins whole, and no temporary file is left. With one fixed
    temporary name the inner write would rename the outer's file away and the outer rename would fail."""
    import os

    from llmeraser import fileio

    path = tmp_path / "data.jsonl"
    real_replace, inner = os.replace, []

    def replace(src, dst):
        if not inner:
            inner.append(True)
            fileio.write_text_atomic(path, "second\n")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    fileio.write_text_atomic(path, "first\n")
    assert path.read_text() == "first\n" and inner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_swap_stopped_between_its_renames_puts_the_previous_output_back(tmp_path, monkeypatch, stop):
    """Ctrl-C (or a failing rename) after the previous output was moved aside and before the new one is in place:
    the previous output is back at `out`, whole, and no staging folder is left."""
    from llmeraser import fileio
    from llmeraser.errors import InputError

    out = tmp_path / "edit"
    with fileio.atomic_dir(out) as work:
        (work / "result.txt").write_text("the previous result")
    real = os.rename

    def rename(src, dst):
        if Path(src).name == "out":  # the new output's move into place
            raise stop("stopped at the swap")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(InputError if stop is OSError else KeyboardInterrupt):
        with fileio.atomic_dir(out, overwrite=True) as work:
            (work / "result.txt").write_text("the new result")
    assert (out / "result.txt").read_text() == "the previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["edit"]


@pytest.mark.parametrize("odd", ["fifo", "dangling link"])
def test_an_odd_file_in_an_output_to_overwrite_is_refused_not_read(tmp_path, odd):
    """A FIFO (reading it would wait forever) or a dangling link inside an output llmeraser wrote: --overwrite
    refuses the folder, naming the entry, instead of hashing it."""
    from llmeraser import fileio
    from llmeraser.errors import InputError

    out = tmp_path / "edit"
    with fileio.atomic_dir(out) as work:
        (work / "result.txt").write_text("a result")
    if odd == "fifo":
        os.mkfifo(out / "pipe")
    else:
        os.symlink(tmp_path / "nowhere", out / "pipe")
    with pytest.raises(InputError, match="holds pipe, which llmeraser did not write"):
        fileio.check_output_dir(out, overwrite=True)
