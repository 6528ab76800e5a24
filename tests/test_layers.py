"""The package's floors: every import inside energy_train (at module level or inside a function)
goes to a module on the same floor or a lower one, and no modules import each other in a
circle. Read from the source (ast): nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "energy_train"
KERNELS = ROOT / "kernels"

# lowest first; a module's floor is that of its longest listed prefix
FLOORS = [
    ("energy_train.kernels", "energy_train.checks", "energy_train.files", "energy_train.knobs",
     "energy_train.tensors", "energy_train.grads", "energy_train.testing",
     "energy_train.telemetry", "energy_train.plots", "energy_train.modes"),
    ("energy_train.models", "energy_train.capture"),
    ("energy_train.ops",),
    ("energy_train.losses",),
    ("energy_train.policy", "energy_train.deploy"),
    ("energy_train.policies", "energy_train.integrations", "energy_train.data"),
    ("energy_train.strategies", "energy_train.distributed"),
    ("energy_train.config",),
    ("energy_train.trainer",),
    ("energy_train.study", "energy_train.plan"),
    ("energy_train.cli", "energy_train.__main__", "energy_train"),  # the facade on top
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in KERNELS.rglob("*.py"):  # installed as energy_train.kernels.<op>
        parts = ("energy_train", "kernels") + path.relative_to(KERNELS).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _floor(name: str) -> int:
    best = None
    for i, names in enumerate(FLOORS):
        for p in names:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{name}: on no floor (add it to FLOORS)"
    return best[0]


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The energy_train modules ``name`` imports (a name imported from a package is the
    submodule when there is one)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [(mod, a.name) for a in node.names]
        else:
            continue
        for mod, attr in targets:
            if not mod or not mod.startswith("energy_train"):
                continue
            sub = f"{mod}.{attr}" if attr else None
            out.add(sub if sub in modules else mod)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path, modules) if m in modules}
            for name, path in modules.items()}


def test_no_import_goes_up_a_floor():
    up = [f"{a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
          for a, deps in _graph().items() for b in deps
          if _floor(b) > _floor(a) and not a.startswith(b + ".")]  # a package's own __init__
    assert not up, "\n".join(sorted(up))


def test_no_import_circle():
    graph = _graph()
    # a submodule importing its own package's __init__ (e.g. for a re-exported name) is no
    # circle unless that __init__ imports back into it: keep every edge
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_trainer_names_no_model_class():
    """The trainer knows a backbone, a head and an energy model only through the Policy
    interface and the energy objective: no module of energy_train.trainer (or the strategies)
    imports energy_train.models or a policy's own model."""
    named = [f"{a} imports {b}" for a, deps in _graph().items()
             if a.startswith("energy_train.trainer") or a == "energy_train.strategies"
             for b in deps if b.startswith(("energy_train.models", "energy_train.policies.tiny",
                                            "energy_train.integrations"))]
    assert not named, named


def test_the_house_stays_small():
    """The Trainer class under 250 lines and every module of energy_train under 400: what one
    reader holds at once (issue 24's bounds); a part that grows moves to a module of its own."""
    core = PKG / "trainer" / "core.py"
    cls = next(n for n in ast.parse(core.read_text()).body
               if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert cls.end_lineno - cls.lineno + 1 < 250, f"Trainer: {cls.end_lineno - cls.lineno + 1} lines"
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big
