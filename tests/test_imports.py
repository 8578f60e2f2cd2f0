"""Imports run one way and change nothing: the architecture's arrows, checked on the source."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "lmm": ROOT / "lmm",
    "lmm.adapters": ROOT / "adapters",
    "lmm.data": ROOT / "data",
    "lmm.eval": ROOT / "eval",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts]) if parts else pkg
            if pkg == "lmm" and parts and parts[0] in ("adapters", "data", "eval"):
                continue
            out[name] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """lmm modules that `name` imports anywhere in its file (function-level imports count too)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_pkg else name.split(".")[:-1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def test_library_modules_never_import_the_layers_above_them():
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(m, p, known) for m, p in mods.items()}
    above_model = (
        "lmm.presets",
        "lmm.training",
        "lmm.serve",
        "lmm.cli",
        "lmm.eval",
        "lmm.data",
        "lmm.web",
        "lmm.testing",
    )
    bad = [
        (m, d)
        for m in ("lmm.model", "lmm.generation", "lmm.chat", "lmm.fusion", "lmm.losses", "lmm.config")
        for d in graph[m]
        if d.startswith(above_model)
    ]
    # lmm.inputs (inference media -> model inputs) shares the loader's media decoders, so inference samples video
    # frames and resamples audio exactly as training did; those decoders are leaves that import no other lmm code
    decoders = ("lmm.data.video", "lmm.data.audio", "lmm.data.media", "lmm.data.errors")
    bad += [(m, d) for m in ("lmm.inputs",) for d in graph[m] if d.startswith(above_model) and d not in decoders]
    bad += [(m, d) for m in decoders if m in graph for d in graph[m] if d not in decoders]
    bad += [(m, d) for m in graph if m.startswith("lmm.adapters") for d in graph[m] if not d.startswith("lmm.adapters")]
    bad += [
        (m, d)
        for m in graph
        if m.startswith(("lmm.bridges", "lmm.encoders"))
        for d in graph[m]
        if d.startswith(above_model + ("lmm.model",))
    ]
    bad += [(m, d) for m in graph if m.startswith("lmm.data") for d in graph[m] if d == "lmm.model"]
    production = [m for m in graph if not m.startswith("lmm.testing")]
    bad += [(m, d) for m in production for d in graph[m] if d == "lmm.testing"]
    assert bad == []


def test_no_import_cycles_between_lmm_modules():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle in the design's sense
    graph = {
        m: {
            d
            for d in ds
            if not (
                d.startswith(m + ".")
                or m.startswith(d + ".")
                and d
                in PACKAGES
                | {
                    "lmm.bridges": 0,
                    "lmm.encoders": 0,
                    "lmm.training": 0,
                    "lmm.serve": 0,
                    "lmm.cli": 0,
                    "lmm.backbones": 0,
                }
            )
        }
        for m, ds in graph.items()
    }
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_importing_lmm_changes_no_environment_variable():
    # third-party packages first (torch sets its own variables on import), then lmm's modules alone
    code = (
        "import os, torch, torch._dynamo, transformers, peft, open_clip; before = dict(os.environ); "
        "import lmm, lmm.model, lmm.presets, lmm.training, lmm.generation, lmm.data, lmm.eval, lmm.cli; "
        "print(sorted(set(os.environ.items()) ^ set(before.items())))"
    )
    env = {k: v for k, v in __import__("os").environ.items() if "OFFLINE" not in k and k != "TOKENIZERS_PARALLELISM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
