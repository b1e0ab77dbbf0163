"""The package's shape (issue 12): stages are leaves of the import graph, the graph is shallow, imports sit at the top
of each module, and every DVC stage depends on exactly the modules it imports."""
import ast
import re
from functools import cache

import pytest
import yaml

from conftest import ROOT

PKG = ROOT / "lexvla"
# the modules that are DVC stages (`python -m lexvla.<stage>`): nothing may import them
STAGES = {"prepare", "convert", "imagecache", "textcache", "train", "evaluate", "search", "report",
          "encode", "export"}  # and the commands (`python -m lexvla.encode`, `.export`)
MAX_FLOORS = 5


def modules() -> list[str]:
    return sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))


def _imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    "(module, line, at top level) of every `lexvla` import in a module's syntax tree."
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            name = node.module
            if node.level == 1: name = f"lexvla.{name}"
            if name.startswith("lexvla."): out.append((name.split(".")[1], node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], node.lineno, id(node) in top) for a in node.names
                    if a.name.startswith("lexvla.")]
    return out


@cache
def imports_of(mod: str) -> frozenset[str]:
    "The lexvla modules `mod` imports directly."
    tree = ast.parse((PKG / f"{mod}.py").read_text())
    return frozenset(m for m, _, _ in _imports(tree) if m != mod)


@cache
def reach(mod: str) -> frozenset[str]:
    "`mod` and every lexvla module it imports, transitively."
    out = {mod}
    for m in imports_of(mod): out |= reach(m)
    return frozenset(out)


@cache
def floor(mod: str) -> int:
    "1 for a module that imports no lexvla module, else one above the highest module it imports."
    return 1 + max((floor(m) for m in imports_of(mod)), default=0)


def test_no_module_imports_a_stage():
    bad = {m: sorted(imports_of(m) & STAGES) for m in modules() if imports_of(m) & STAGES}
    assert not bad, f"stages must be leaves; these modules import a stage: {bad}"


def test_import_graph_is_shallow():
    floors = {m: floor(m) for m in modules()}
    assert max(floors.values()) <= MAX_FLOORS, sorted(floors.items(), key=lambda kv: -kv[1])


def test_lexvla_imports_sit_at_the_top():
    "A module's header shows what it depends on: no lexvla import inside a function."
    late = {m: [line for _, line, top in _imports(ast.parse((PKG / f"{m}.py").read_text())) if not top]
            for m in modules()}
    late = {m: lines for m, lines in late.items() if lines}
    assert not late, f"lexvla imports inside functions (module: lines): {late}"


def _stage_module(cmd: str) -> str | None:
    m = re.match(r"python -m lexvla\.(\w+)", cmd)
    return m[1] if m else None


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_dvc_deps_are_the_modules_the_stage_imports(stage):
    spec = dvc_stages()[stage]
    spec = spec.get("do", spec)
    cmds = spec["cmd"] if isinstance(spec["cmd"], list) else [spec["cmd"]]
    want = set()
    for c in cmds:
        if (mod := _stage_module(c)) is not None: want |= {f"lexvla/{m}.py" for m in reach(mod)}
    have = {d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith("lexvla/")}
    assert have == want, (f"{stage}: dvc.yaml lists {sorted(have - want)} that it does not import and misses "
                          f"{sorted(want - have)}")


MAX_FUNCTION_LINES = 60  # issue 22: a function a reader can hold (the package's median is 7)


def test_no_function_is_over_60_lines():
    funcs = [(m, n) for m in modules() for n in ast.walk(ast.parse((PKG / f"{m}.py").read_text()))
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [f"{m}.{n.name}: {n.end_lineno - n.lineno + 1}" for m, n in funcs
            if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


# the cells allowed over the limit: one class each, holding only its core (`__init__`, properties, `forward`); every
# other method group is a `@patch` cell of its own. LexVLA's constructor builds both towers in one seeded order.
LONG_CLASS_CELLS = {("06c_model", "LexVLA")}


def test_no_notebook_cell_is_over_60_lines():
    import json
    long = set()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            src = "".join(c["source"])
            if c["cell_type"] == "code" and len(src.splitlines()) > MAX_FUNCTION_LINES:
                body = ast.parse("\n".join(l for l in src.splitlines() if not l.startswith("%"))).body
                big = max(body, key=lambda n: n.end_lineno - n.lineno)  # the statement that makes it long
                long.add((nb.stem, getattr(big, "name", src.splitlines()[0])))
    assert long <= LONG_CLASS_CELLS, f"cells over {MAX_FUNCTION_LINES} lines: {sorted(long - LONG_CLASS_CELLS)}"


def test_no_private_name_is_imported_across_modules():
    "A helper another module needs is public (in its module's `__all__`), not an underscored name reached into."
    bad = [f"{m} imports {a.name} from {n.module}" for m in modules()
           for n in ast.walk(ast.parse((PKG / f"{m}.py").read_text()))
           if isinstance(n, ast.ImportFrom) and n.level == 1 for a in n.names if a.name.startswith("_")]
    assert not bad, bad
