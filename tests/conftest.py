"""Shared fixtures: the repository root and the venv's executables."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest also has nbdev, dvc, jupyter


def tool(name: str) -> str:
    "Path of a console script installed beside the running Python."
    p = BIN / name
    return str(p) if p.exists() else name


def run(cmd, cwd=ROOT, timeout=600, check=True, env=None):
    "Run a command, returning CompletedProcess; on failure show its output."
    e = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
    return r


def module_notebooks():
    return sorted(p for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))


def analysis_notebooks():
    return sorted((ROOT / "notebooks" / "analysis").glob("[!_]*.ipynb"))


@pytest.fixture(scope="session")
def root():
    return ROOT
