"""A tiny local corpus (``<domain>/*.txt``) and params for the orchestration tests, built at test time.

Text comes from the Python standard library's source and from generated prose: nothing third-party
is committed. Domain sizes are unequal on purpose (as in real corpora).
"""
from __future__ import annotations

import os
import random
import socket
import sysconfig
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.environ.get("DOGRAPH_VENV_BIN", ROOT / ".venv" / "bin"))
_WORDS = {
    "prose": "river stone light quiet north window garden music paper letter bright under over".split(),
    "notes": "graph domain mixture weight model token gradient cluster batch step loss rate".split(),
    "letters": "dear friend thank you meeting tomorrow regards sincerely office please reply soon".split(),
}


def _generated(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "."
                 for _ in range(rng.randint(8, 20))]
        docs.append(" ".join(sents))
    return docs


def write_local_corpus(root: Path) -> Path:
    """code (stdlib source, largest), prose, notes (smallest) and letters (held out)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace")[:3000] for p in sorted(stdlib.glob("*.py"))[:60]]
    domains = {
        "code": code,
        "prose": _generated(_WORDS["prose"], 40, 1),
        "notes": _generated(_WORDS["notes"], 14, 2),
        "letters": _generated(_WORDS["letters"], 20, 3),
    }
    for d, docs in domains.items():
        (root / d).mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(docs):
            (root / d / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    return root


def nano_overrides(tmp: Path, corpus: Path, methods: str = "[uniform,natural]", uri: str | None = None) -> list[str]:
    """Overrides that put every output under ``tmp`` and read the local corpus (nano preset)."""
    ov = [
        "prepare.source=local", f"prepare.local.path={corpus}", "prepare.heldout=[letters]",
        "prepare.total_mb=0.2", "prepare.heldout_mb=0.03", "prepare.min_ratio=1",
        f"prepare.out_dir={tmp / 'data' / 'prepared'}", f"prepare.cache_dir={tmp / 'data' / 'raw'}",
        f"tokenize.out_dir={tmp / 'data' / 'tokenized'}", f"pipeline.out_dir={tmp / 'runs'}",
        f"pipeline.methods={methods}",
        f"tracking.uri={uri or 'sqlite:///' + str(tmp / 'mlflow.db')}",
    ]
    return ov


def write_params(path: Path, overrides: list[str], preset: str = "nano") -> Path:
    """A params file = params.yaml + preset + overrides, resolved (for DVC, which reads one file)."""
    from dograph_core.config import load_raw

    raw = load_raw(ROOT / "params.yaml", preset, overrides)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(tmp: Path) -> dict[str, str]:
    """Environment for subprocesses: offline, no telemetry, Prefect's home under ``tmp``."""
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp / "prefect-home"),
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
    })
    return env
