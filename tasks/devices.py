"""Which GPU each parallel unit of a pipeline run trains on.

Without this every parallel training resolves ``train.device: auto`` to ``cuda:0`` (``LOCAL_RANK``
is 0 outside torchrun), so N parallel runs share one GPU while the others idle. A unit leases a
device for as long as it runs: the first free one in round-robin order from its slot (its index in
the run), so ``max_parallel`` units on as many GPUs get one each. Leases are ``flock`` files in the
run directory, so they hold across threads, the process pool and in-process Dask workers. With more
parallel units than GPUs the extra ones share, still round-robin (``cuda:<slot mod n>``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from dograph_core.config import Params
from dograph_core.io import try_flock


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def assigns_devices(p: Params) -> bool:
    """Spread units over GPUs only for parallel, single-process runs that left the device to us."""
    return p.pipeline.max_parallel > 1 and p.pipeline.nproc_per_node == 1 and p.train.device in ("auto", "cuda")


@contextlib.contextmanager
def device_lease(p: Params, lock_dir: str | Path, slot: int) -> Iterator[Optional[str]]:
    """Yield ``cuda:<i>`` for this unit while it runs, or None (keep ``train.device``)."""
    n = visible_gpus() if assigns_devices(p) else 0
    if n < 2:
        yield None
        return
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    import fcntl

    for i in [(slot + k) % n for k in range(n)]:
        fd = os.open(lock_dir / f"cuda{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        if not try_flock(fd):
            continue
        try:
            yield f"cuda:{i}"
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    yield f"cuda:{slot % n}"  # every GPU is busy: share one, round-robin
