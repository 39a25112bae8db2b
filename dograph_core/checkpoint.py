"""Training checkpoints: data, not code.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts
(numpy arrays in a mixer's state are stored as tagged tensors and come back as arrays), so it
loads with ``torch.load(..., weights_only=True)``. Files are written atomically
(``checkpoints/step_0000300.pt``); the two newest are kept. Each carries a *fingerprint* of the
run's configuration; resuming from a checkpoint of a different configuration is an error that
names every differing key. Before loading, a checkpoint's zip CRCs are checked: a corrupt newest
checkpoint (a flipped bit, a truncated file) is skipped with a warning for the one before it.
"""
from __future__ import annotations

import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dograph_core.io import atomic_path, output_error

FORMAT = "dograph-ckpt/1"
KEEP = 2
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume this run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read back as written (truncated, garbage, a CRC mismatch)."""


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped for an older one."""


class _Sink:
    """The file ``torch.save`` writes through; keeps the OSError its writer reports only as 'unexpected pos'."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def to_storable(obj: Any) -> Any:
    """Make a state safe for ``weights_only`` loading: numpy values become tensors or Python numbers."""
    if isinstance(obj, np.ndarray):
        return {"__numpy__": torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_storable(v) for v in obj)
    return obj


def from_storable(obj: Any) -> Any:
    """Inverse of :func:`to_storable`."""
    if isinstance(obj, dict):
        if set(obj) == {"__numpy__"}:
            return obj["__numpy__"].numpy()
        return {k: from_storable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_storable(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_storable(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [(v.tolist() if isinstance(v, np.ndarray) else v) for v in np.random.get_state()],
        "python": to_storable(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = from_storable(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int = KEEP) -> Path:
    """Write ``state`` (plus format and step) atomically; remove all but the ``keep`` newest."""
    path = checkpoint_path(ckpt_dir, step)
    payload = to_storable({"format": FORMAT, "step": int(step), **state})
    sink = None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            sink = _Sink(f)
            torch.save(payload, sink)
    except (OSError, RuntimeError) as e:
        err = sink.error if sink is not None and sink.error is not None else e
        if isinstance(err, OSError):
            raise output_error(path, err) from None
        raise
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def verify_checkpoint(path: Path) -> None:
    """Check every record of a checkpoint against its zip CRC (``torch.load`` does not)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if bad is not None:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: record {bad} does not match its CRC")


def load_latest(ckpt_dir: Path, fingerprint: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Load the newest sound checkpoint of ``ckpt_dir``; a corrupt one is skipped with a warning naming it."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to resume from")
    bad: list[str] = []
    for _, path in reversed(found):
        try:
            return load_checkpoint(path, fingerprint), path
        except CorruptCheckpointError as e:
            bad.append(str(e))
            warnings.warn(f"{e}; skipping it for an older checkpoint (delete the file once you have looked at it)",
                          CheckpointWarning, stacklevel=2)
    raise CheckpointError("no usable checkpoint:\n  " + "\n  ".join(bad)
                          + "\ndelete them and train again, or train into a new output directory")


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint (CRC-checked, weights_only) and check that it belongs to a run configured like this one."""
    verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dograph checkpoint (expected format {FORMAT!r})")
    old = ckpt.get("fingerprint", {})
    diff = [
        f"{k}: checkpoint has {old.get(k)!r}, this run has {fingerprint.get(k)!r}"
        for k in sorted(set(old) | set(fingerprint))
        if old.get(k) != fingerprint.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {path} comes from a different configuration:\n  " + "\n  ".join(diff)
            + "\nresume with the original configuration, or train into a new output directory"
        )
    return ckpt
