"""Small I/O helpers shared by every stage: atomic writes, so no half-written output survives a crash."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional


class OutputError(RuntimeError):
    """An output that cannot be written (read-only, a file in the way, disk full); the message names the path."""


def output_error(path: str | Path, e: OSError) -> OutputError:
    """``cannot write PATH: REASON (ENOSPC)`` for an OSError met while writing ``path``."""
    code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    return OutputError(f"cannot write {path}: {e.strerror or e}{code}")


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that files can be created in it, before any work is done."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"cannot write {path}: it is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise output_error(path, e) from None
    return path


def remove_leftovers(directory: str | Path, name: str = "*") -> list[Path]:
    """Remove what a killed writer left in ``directory``: ``atomic_path``'s ``.name.*.tmp`` and
    ``.name.old-*`` (every name, or only those of ``name``)."""
    directory = Path(directory)
    patterns = (f".{name}.*.tmp", f".{name}.old-*") if name != "*" else (".*.tmp", ".*.old-*")
    gone = [p for pattern in patterns for p in directory.glob(pattern)] if directory.is_dir() else []
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under umask 022)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        umask = int(next(line.split()[1] for line in status if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o22)
        os.umask(umask)
    return 0o666 & ~umask


def is_transient(e: BaseException) -> bool:
    """A failure that may pass on a retry: an OS or network error that is not a missing or forbidden path."""
    return isinstance(e, OSError) and not isinstance(
        e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


class RunLockedError(RuntimeError):
    """Another process is working in the same directory."""


def try_flock(fd: int, exclusive: bool = True) -> bool:
    """Take ``flock`` on the open ``fd`` without waiting. False (``fd`` closed) when another process
    holds it; any other error closes ``fd`` and is raised."""
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


class RunLock:
    """An exclusive, non-blocking lock on a directory (``<dir>/.lock``), released when the process dies."""

    def __init__(self, run_dir: str | Path, hint: str = "start a separate run with --run-id NAME",
                 what: str = "run directory"):
        self.path = Path(run_dir) / ".lock"
        self.hint, self.what = hint, what
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise output_error(self.path.parent, e) from None
        if not try_flock(fd):
            holder = self.path.read_text().strip() or "another process"
            raise RunLockedError(
                f"{self.what} {self.path.parent} is in use by {holder}; wait for it to finish, or {self.hint}"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Works for a file or a directory. On any exception the temporary is removed and
    ``path`` is untouched, so a killed or failed writer never leaves partial output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def code_fingerprint(path: str | Path) -> str:
    """A hash of a Python file's syntax tree without its docstrings: what it does, not how it is written
    up (comments are not in the tree; layout neither). A file that does not parse is hashed as bytes."""
    import ast
    import hashlib

    data = Path(path).read_bytes()
    try:
        tree = ast.parse(data, filename=str(path))
    except (SyntaxError, ValueError):
        return hashlib.sha256(data).hexdigest()[:16]
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()[:16]
