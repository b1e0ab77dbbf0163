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


# ---- `dvc repro` on profiles/tiny.yaml in two fresh copies, started as soon as a test that needs it is collected --

REPRO_TIMEOUT = 1200  # s: both copies, on a busy 2-core machine
_repro: dict = {}


EXTRA_SET_IMAGES = 12  # the second eval set of the repro copies


def write_extra_set(folder: Path, n: int = EXTRA_SET_IMAGES) -> str:
    "A small Karpathy split JSON (test split) of `n` scenes unlike the embedded ones, with its images; its path."
    from PIL import Image

    from lexvla.karpathy import karpathy_entry
    from lexvla.runtime import write_json
    from lexvla.scenes import make_scene, scene_rng
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        sc = make_scene(scene_rng(99, "test", i), 112, 1, 2, 3)  # another seed, at most 2 objects, 3 captions each
        Image.fromarray(sc.image).save(folder / "images" / f"extra_{i:03d}.png")
        entries.append(karpathy_entry(i, f"extra_{i:03d}.png", "test", sc.meta()["captions"], 3 * i))
    write_json(folder / "dataset_extra.json", {"images": entries, "dataset": "extra"})
    return "data/extra/dataset_extra.json"


def fresh_copy(dest: Path, profile: str = "tiny", extra_set: bool = False) -> Path:
    """The repository's tracked and untracked-but-not-ignored files in `dest`, params.yaml = params.yaml + `profile`,
    git-committed; `extra_set`: with a second evaluated set (`write_extra_set`)."""
    import shutil

    import yaml

    from lexvla.params import apply_profile
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        # the committed lock and metrics are the default's full run, not the copy's
        if f == "dvc.lock" or (f.startswith("results/") and f != "results/.gitkeep") or not src.is_file(): continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / f)
    merged = apply_profile(ROOT / "profiles" / f"{profile}.yaml", ROOT / "params.yaml")
    if extra_set:  # a second evaluated set, a Karpathy JSON of its own: evaluated beside the first by one repro
        merged["evaluate"]["sets"]["extra"] = {"source": write_extra_set(dest / "data" / "extra"),
                                               "image_root": "data/extra/images"}
    (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    git = ["git", "-c", "user.name=lexvla tests", "-c", "user.email=tests@lexvla.invalid", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    return dest


def start_repro():
    "Two fresh copies, each running `dvc repro` in the background, one thread each (the tests go on meanwhile)."
    import tempfile
    if _repro: return _repro
    top = Path(tempfile.mkdtemp(prefix="lexvla-repro-"))
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("LEXVLA_FAULT", None)
    _repro["top"], _repro["runs"] = top, {}
    for name in ("a", "b"):
        root = fresh_copy(top / name, extra_set=True)
        log = open(top / f"{name}.log", "w")
        _repro["runs"][name] = (root, subprocess.Popen([tool("dvc"), "repro"], cwd=root, env=env, stdout=log,
                                                       stderr=subprocess.STDOUT), log)
    return _repro


def pytest_collection_modifyitems(config, items):
    "The tests that wait for the background `dvc repro` runs go last, so that every other test overlaps with them."
    items.sort(key=lambda item: item.get_closest_marker("repro") is not None)


def pytest_collection_finish(session):
    if session.config.option.collectonly: return
    if any(item.get_closest_marker("repro") for item in session.items): start_repro()


def pytest_sessionfinish(session):
    import shutil
    for _, p, log in _repro.get("runs", {}).values():
        if p.poll() is None: p.kill()
        log.close()
    if "top" in _repro and not os.environ.get("LEXVLA_KEEP_REPRO"): shutil.rmtree(_repro["top"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_repro():
    "{name: repository root} of the two finished `dvc repro` copies (fails with the log of one that failed)."
    start_repro()
    out = {}
    for name, (root, p, log) in _repro["runs"].items():
        try: rc = p.wait(timeout=REPRO_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"dvc repro in copy {name} took over {REPRO_TIMEOUT} s")
        log.flush()
        if rc != 0:
            pytest.fail(f"dvc repro in copy {name} ({root}) exited {rc}:\n"
                        f"{(_repro['top'] / f'{name}.log').read_text()[-6000:]}")
        out[name] = root
    return out
