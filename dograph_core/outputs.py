"""What a training run leaves behind: the step log, the final model, and the flat summary of its evaluation."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dograph_core.io import atomic_path, file_mode


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed as training goes.

    On resume, lines of steps after the checkpoint (written before the kill) are dropped first,
    so the log of a resumed run equals the log of an uninterrupted one.
    """

    def __init__(self, path: Path, enabled: bool = True, truncate_after: int = 0):
        self._f = None  # (so that close() works even when __init__ fails)
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep: list[str] = []
        if truncate_after and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= truncate_after:
                        keep.append(line)
                except ValueError:
                    break  # a line cut by the kill: drop it and everything after
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in keep))
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __del__(self) -> None:
        self.close()


def save_final(model, tokenizer_dir: Path, final_dir: Path) -> Path:
    """The final model (safetensors) and a copy of the tokenizer, loadable with ``from_pretrained``."""
    from transformers.utils import logging as hf_logging

    with atomic_path(final_dir) as tmp:
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one file: its "Writing model shards" bar is noise, also under --quiet
        try:
            model.save_pretrained(tmp)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        tok = Path(tokenizer_dir)
        if tok.is_dir():
            for f in tok.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():  # safetensors writes 0600; the model is an output like any other file
            os.chmod(f, file_mode())
    return final_dir


def summarize_eval(ev: dict[str, Any], flat: bool = False) -> dict[str, Any]:
    """Headline numbers of :func:`dograph_core.evaluate.evaluate_final`.

    ``flat=True`` gives tracker metrics (``test_loss/<d>``, ``last_word_acc/<d>``, ...).
    """
    val, test = ev["val"], ev["test"]
    out: dict[str, Any] = {
        "val_loss_mean": val["loss_mean"],
        "val_loss_worst": val["loss_worst"],
        "test_loss_mean": test["loss_mean"],
        "test_loss_worst": test["loss_worst"],
        "last_word_acc_mean": ev.get("last_word_mean"),
    }
    if not flat:
        out["val_worst_domain"] = val["worst_domain"]
        out["heldout_val_loss"] = {d: v["loss"] for d, v in val["heldout"].items()}
        return out
    out = {k: v for k, v in out.items() if v is not None}
    for split, res in (("val", val), ("test", test)):
        out.update({f"{split}_loss/{d}": v["loss"] for d, v in res["domains"].items()})
        out.update({f"{split}_ppl/{d}": v["ppl"] for d, v in res["domains"].items()})
    out.update({f"heldout_loss/{d}": v["loss"] for d, v in val["heldout"].items()})
    out.update({f"test_heldout_loss/{d}": v["loss"] for d, v in test["heldout"].items()})
    out.update({f"last_word_acc/{d}": v["accuracy"] for d, v in ev.get("last_word", {}).items() if v["n"]})
    return out
