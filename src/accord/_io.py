"""Atomic file writes (a file is written next to its target, then renamed over it) and JSON
reads whose errors name the file."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    # os.open with 0o666 gives the file the user's umask, as a plain open() would; mkstemp's
    # 0600 would make every written file private.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_json(
    path: str | os.PathLike[str], error: type[Exception], *, missing: str = "", broken: str = ""
) -> Any:
    """The JSON in file ``path``; ``error`` naming it when it does not exist (``missing``: what
    that means, or what to do), cannot be read, or is not valid JSON (``broken`` likewise)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{path} does not exist{_tail(missing)}") from exc
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}){_tail(broken)}") from exc


def _tail(text: str) -> str:
    return f"; {text}" if text else ""
