"""ARCHITECTURE rule 12: generic layers know no concrete model, and nothing imports in a circle.

- Importing every module of `concord.pipelines` and `concord.attention` (in a fresh interpreter) loads no concrete
  model module (`concord.micro.*`, `concord.models.tiny`).
- Statically (ast over the source, imports inside functions included): no module of those generic layers imports
  a concrete model module, and, leaving out the registry (the one module meant to name every model), the import
  graph has no cycle through both a generic layer and a concrete model.
- The registry's table "kind -> parts factory" covers every kind a model can load as, and its factories resolve.
- `JobInputError` lives in the neutral `concord.errors` and the job system's old import path is the same class.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import concord

PACKAGE_DIR = Path(concord.__file__).resolve().parent
GENERIC = ("concord.pipelines", "concord.attention")
CONCRETE = ("concord.micro", "concord.models.tiny")
COMPOSITION_ROOT = "concord.models.registry"  # names every model by design (loading, the parts table)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, Path]:
    """Every concord module -> its source file."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Concord modules `module` imports anywhere in its source (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for name in names:
            # the longest known module the name refers to (a `from package import submodule` counts as that module)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan 1972, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.add(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(comp)
    return out


def test_the_static_check_sees_generic_and_concrete_modules():
    graph = _graph()
    assert any(_under(m, GENERIC) for m in graph) and any(_under(m, ("concord.micro",)) for m in graph)
    assert "concord.models.tiny" in graph
    # the parser sees lazy imports: the registry loads micro inside a function
    assert "concord.micro.model" in graph[COMPOSITION_ROOT]
    # and the concrete model depends on the generic interfaces (the allowed direction)
    assert "concord.pipelines.denoiser" in graph["concord.micro.model"]


def test_no_generic_module_imports_a_concrete_model():
    graph = _graph()
    offending = {
        m: sorted(d for d in deps if _under(d, CONCRETE))
        for m, deps in graph.items()
        if _under(m, GENERIC)
    }
    assert {m: d for m, d in offending.items() if d} == {}


def test_no_import_cycle_through_a_generic_layer_and_a_concrete_model():
    graph = {m: {d for d in deps if d != COMPOSITION_ROOT} for m, deps in _graph().items() if m != COMPOSITION_ROOT}
    bad = [
        sorted(c) for c in _cycles(graph) if any(_under(m, GENERIC) for m in c) and any(_under(m, CONCRETE) for m in c)
    ]
    assert bad == []


def test_cycle_finder_finds_a_cycle():
    """The checker itself can fail: a planted circle generic -> concrete -> generic is found."""
    planted = {"concord.pipelines.a": {"concord.micro.b"}, "concord.micro.b": {"concord.pipelines.a"}, "x": {"y"}, "y": set()}
    assert _cycles(planted) == [{"concord.pipelines.a", "concord.micro.b"}]


_PROBE = r"""
import importlib, json, pkgutil, sys
import concord.pipelines, concord.attention
concrete = ("concord.micro", "concord.models.tiny")
loaded = {}
names = []
for pkg in (concord.pipelines, concord.attention):
    names.append(pkg.__name__)
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
    for m in list(sys.modules):
        if any(m == c or m.startswith(c + ".") for c in concrete):
            loaded.setdefault(m, name)
print(json.dumps({"imported": names, "concrete": loaded}))
"""


def test_importing_generic_layers_loads_no_concrete_model():
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert "concord.pipelines.denoiser" in report["imported"] and "concord.attention.extended" in report["imported"]
    assert report["concrete"] == {}


def test_micro_imports_first_in_a_fresh_interpreter():
    """The old circle (denoiser <-> micro.model) broke whichever side a process imported first; now either order
    works and the micro kind's parts come through the registry's table."""
    code = (
        "import concord.micro.model as M; import concord.pipelines.denoiser as D; "
        "from concord.models.registry import parts_factory; assert parts_factory('micro') is M.micro_model_parts"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------------------ the kind table


def test_every_loadable_kind_has_a_parts_factory():
    from concord.models import registry

    kinds = {p.kind for p in registry.PRESETS.values()} | set(registry._FOLDER_KINDS.values()) | set(registry.KIND_RECOMMENDED)
    assert kinds <= set(registry.PARTS_FACTORIES)
    for kind in registry.PARTS_FACTORIES:
        assert callable(registry.parts_factory(kind))


@pytest.mark.parametrize("kind, match", [("sdxl-controlnet", "SDXL"), ("no-such-kind", "no-such-kind")])
def test_kinds_that_cannot_run_are_refused_naming_the_model_field(kind, match):
    from concord.errors import JobInputError
    from concord.pipelines.denoiser import denoiser_from_model

    with pytest.raises(JobInputError, match=match) as err:
        denoiser_from_model(SimpleNamespace(kind=kind, pipe=None, device="cpu"))
    assert err.value.field == "model" and err.value.hint


def test_micro_kind_gets_micro_parts_through_the_table():
    from concord.micro.model import MicroDenoiser, build_pipeline
    from concord.pipelines.denoiser import PixelUnshuffleCodec, denoiser_from_model

    pipe = build_pipeline("test")
    parts = denoiser_from_model(SimpleNamespace(kind="micro", pipe=pipe, device="cpu"))
    assert isinstance(parts.denoiser, MicroDenoiser) and isinstance(parts.codec, PixelUnshuffleCodec)
    assert parts.kind == "micro" and parts.denoiser.prediction_type == pipe.scheduler.config.prediction_type


def test_job_input_error_is_one_class_in_a_neutral_module():
    from concord import errors
    from concord.jobs import context

    assert context.JobInputError is errors.JobInputError
    assert _imports("concord.errors", PACKAGE_DIR / "errors.py", set(_modules())) == set()
