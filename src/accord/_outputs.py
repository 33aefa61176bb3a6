"""Output folders: staged whole beside their target, swapped in by rename, overwritten only when
accord wrote them.

A folder accord writes (a checkpoint, a merge output) is filled under a hidden staging name in
the target's parent, given a manifest (:data:`MANIFEST`: the output's kind and the entries accord
wrote) in every folder of its tree, then renamed onto the target in one step: a reader sees the
old folder or the new one, each whole. Overwriting replaces only a folder whose manifests show
that accord wrote all of it as the same kind of output, never a folder holding anything else (a
model store, a user's files) and never an input.

Hidden leftovers (``.<name>.accord-staging.…`` while filling, ``.<name>.accord-old.…`` while a
swap without an atomic exchange moves the old folder aside) carry their writer's host and process
id. The next write in the same parent removes those whose writer is gone and puts back an old
folder that a killed swap had moved aside; a running writer's are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accord._io import write_json
from accord._version import __version__
from accord.errors import OutputError

MANIFEST = "accord-output.json"

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(
    r"\.(?P<name>.+)\.accord-(?P<role>staging|old)"
    r"\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]{8}"
)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_output(
    target: str | os.PathLike[str],
    kind: str,
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """``target`` as a path, once it is known that a ``kind`` output can be written there.

    Leftovers of killed writers beside it are cleaned first. OutputError, naming the folder and
    why, when it is, holds or lies inside one of ``inputs``; when a file stands where a folder
    must be or the parent is not writable; when it exists and ``overwrite`` is off; when it
    exists and accord did not write all of it as a ``kind`` output.
    """
    path = Path(target)
    _check_apart_from_inputs(path, inputs)
    _check_parent_writable(path)
    if path.parent.is_dir():
        clean_leftovers(path.parent)
    if os.path.lexists(path):
        if not overwrite:
            raise OutputError(
                f"{path} already exists; choose another output folder, or overwrite it "
                "(--overwrite, overwrite=True) if accord wrote it"
            )
        problem = _not_written_by_accord(path, kind)
        if problem:
            raise OutputError(
                f"refusing to overwrite {path}: {problem}. accord overwrites only a {kind} folder "
                f"it wrote itself; delete {path} yourself or choose another output folder"
            )
    return path


def write_folder(
    target: str | os.PathLike[str],
    kind: str,
    fill: Callable[[Path], None],
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write the folder that ``fill(staging)`` fills onto ``target`` in one rename.

    :func:`check_output`'s rules apply. ``target`` keeps its old content until the new folder is
    complete; if ``fill`` or the swap fails, nothing at ``target`` changes.
    """
    path = check_output(target, kind, overwrite=overwrite, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _leftover_path(path, "staging")
    staging.mkdir()  # not mkdtemp: the output gets the user's umask, not mode 0700
    try:
        fill(staging)
        _write_manifests(staging, kind)
        _swap_in(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange it holds the old folder
    return path


def clean_leftovers(parent: Path) -> None:
    """Remove the staging folders in ``parent`` whose writer is gone; put back an old folder a
    killed swap had moved aside when nothing took its place, else remove it."""
    for entry in sorted(parent.iterdir()):
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or match["host"] != _HOST or _running(int(match["pid"])):
            continue
        target = parent / match["name"]
        if match["role"] == "old" and not os.path.lexists(target):
            with contextlib.suppress(FileNotFoundError):  # another process put it back first
                os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _leftover_path(target: Path, role: str) -> Path:
    token = secrets.token_hex(4)
    return target.parent / f".{target.name}.accord-{role}.{_HOST}.{os.getpid()}.{token}"


def _running(pid: int) -> bool:
    """Whether process ``pid`` of this host may still run; when unsure, it may."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def _check_apart_from_inputs(path: Path, inputs: Sequence[str | os.PathLike[str]]) -> None:
    target = path.resolve()
    for given in inputs:
        model = Path(given).resolve()
        if target == model:
            why = f"it is input model {given}"
        elif target in model.parents:
            why = f"it holds input model {given}"
        elif model in target.parents:
            why = f"it lies inside input model {given}"
        else:
            continue
        raise OutputError(
            f"refusing to write {path}: {why}; choose an output folder apart from the models"
        )


def _check_parent_writable(path: Path) -> None:
    existing = next(p for p in path.absolute().parents if os.path.lexists(p))
    if not existing.is_dir():
        raise OutputError(
            f"cannot write {path}: {existing} is a file, not a folder; choose another output path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {path}: folder {existing} is not writable (permissions or a read-only "
            "file system); choose an output folder you can write to"
        )


def _not_written_by_accord(folder: Path, kind: str) -> str | None:
    """What in ``folder`` accord did not write as a ``kind`` output; None when it wrote it all."""
    if folder.is_symlink():
        return f"{folder} is a symbolic link"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    manifest = _read_manifest(folder)
    if manifest is None:
        return f"{folder} has no readable {MANIFEST}, so accord did not write it"
    if manifest.get("kind") != kind:
        return f"{folder / MANIFEST} describes a {manifest.get('kind')!r} folder, not a {kind!r}"
    written = set(manifest.get("entries", []))
    for entry in sorted(folder.iterdir()):
        if entry.name == MANIFEST:
            continue
        if entry.name not in written:
            return f"{entry} was not written by accord"
        if entry.is_dir() and not entry.is_symlink():
            problem = _not_written_by_accord(entry, kind)
            if problem:
                return problem
    return None


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_manifests(root: Path, kind: str) -> None:
    """One manifest in every folder of ``root``'s tree, listing what accord wrote there."""
    for folder, subfolders, files in os.walk(root):
        entries = sorted(name for name in (*subfolders, *files) if name != MANIFEST)
        manifest = {"kind": kind, "written_by": f"accord {__version__}", "entries": entries}
        write_json(Path(folder) / MANIFEST, manifest)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` onto ``target``; an old ``target`` ends up at ``staging``'s path."""
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif not _exchange(staging, target):
        # Without an atomic exchange the old folder is moved aside first and removed only after
        # the new one is in place; clean_leftovers puts it back if a kill falls in between.
        backup = _leftover_path(target, "old")
        os.rename(target, backup)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where that is unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system
            return False
        raise OSError(code, os.strerror(code), str(second))
    return True


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if function is not None:
        path, directory = ctypes.c_char_p, ctypes.c_int
        function.argtypes = [directory, path, directory, path, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function
