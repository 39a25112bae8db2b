"""``pip install .`` (not editable) gives a working ``dograph``: the wheel is built from a copy of the
sources, installed into a new virtual environment, and run from a directory outside the checkout.

The new environment gets the project's third-party packages (torch, transformers, Prefect, ...) through
a path entry to this venv's site-packages, so nothing is downloaded; that entry does not run this venv's
``.pth`` files, so the editable install of the checkout stays out and ``dograph_core``, ``tasks`` and
``flows`` come from the wheel alone (checked). The build must not print setuptools' deprecation
warnings (the licence one was printed on every install).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from _orch_fixture import ROOT, nano_overrides, write_local_corpus

SOURCES = ["pyproject.toml", "README.md", "LICENSE", "dograph_core", "tasks", "flows", "configs"]
# a params file of the user's own: nothing is read from the checkout
PARAMS = """\
methods:
  uniform: {type: uniform}
  natural: {type: natural}
pipeline:
  methods: [uniform, natural]
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        f = ROOT / name
        if f.is_dir():
            shutil.copytree(f, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(f, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                  str(src)], cwd=tmp, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel = next((tmp / "dist").glob("dograph-*.whl"))

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    inst = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
                cwd=tmp, env=env)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp / "work"  # outside the checkout: no params.yaml, configs/ or packages of the checkout here
    work.mkdir()
    (work / "params.yaml").write_text(PARAMS)
    env.update({"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "PREFECT_HOME": str(tmp / "prefect")})
    return {"tmp": tmp, "wheel": wheel, "venv": venv, "py": py, "work": work, "env": env,
            "build_log": build.stdout + build.stderr}


def test_the_build_prints_no_deprecation_warning(installed):
    log = installed["build_log"]
    assert "deprecated" not in log.lower() and "SetuptoolsDeprecationWarning" not in log, log


def test_the_wheel_ships_every_module_the_presets_the_licence_and_py_typed(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for pkg in ("dograph_core", "tasks", "flows"):  # the package list in pyproject.toml is explicit: none is left out
        for f in (ROOT / pkg).rglob("*.py"):
            assert str(f.relative_to(ROOT)) in names, f"{f.relative_to(ROOT)} is not in the wheel"
    for f in (ROOT / "configs" / "presets").glob("*.yaml"):
        assert f"dograph_core/presets/{f.name}" in names
    assert "dograph_core/py.typed" in names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(installed["wheel"]).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_dograph_runs_from_outside_the_checkout(installed):
    work, env = installed["work"], installed["env"]
    dograph = str(installed["venv"] / "bin" / "dograph")
    where = _run([str(installed["py"]), "-c", "import dograph_core, tasks, flows; "
                  "print(*(m.__file__ for m in (dograph_core, tasks, flows)), sep='\\n')"], work, env)
    assert where.returncode == 0, where.stderr
    for f in where.stdout.split():
        assert Path(f).is_relative_to(installed["venv"]), f"{f} is not the installed copy"

    out = _run([dograph, "--help"], work, env)
    assert out.returncode == 0 and "presets" in out.stdout and "prepare" in out.stdout, out.stderr
    out = _run([dograph, "--version"], work, env)
    assert out.returncode == 0 and out.stdout.strip() == "dograph 0.1.0", out.stdout + out.stderr

    out = _run([dograph, "presets"], work, env)
    assert out.returncode == 0, out.stderr
    listed = {ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith("  ")}
    assert {"default", "quick", "nano", "gpu"} <= listed
    assert str(installed["venv"]) in out.stdout  # read from the installed package, not from configs/

    # the quick preset's first stage, on a tiny local corpus
    corpus = write_local_corpus(installed["tmp"] / "corpus")
    ov = nano_overrides(installed["tmp"], corpus)
    args = [x for o in ov for x in ("--set", o)]
    out = _run([dograph, "prepare", "--preset", "quick", "--quiet", *args], work, env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "prepared data in" in out.stdout
    assert (installed["tmp"] / "data" / "prepared" / "manifest.json").exists()
    out = _run([dograph, "prepare", "--preset", "nosuch", *args], work, env)
    assert out.returncode == 2 and "known presets" in out.stderr and "quick" in out.stderr
