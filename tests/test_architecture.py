"""Imports flow one way. Each top-level part of the package sits in a layer and may import only from layers
below it: nothing imports upwards or sideways within a layer (the report, for instance, reads results.json and
never imports the audit or training). An AST walk, so that lazy imports inside functions count too."""

import ast
from pathlib import Path

import pupil

SRC = Path(pupil.__file__).parent
LAYERS = [
    {"errors"},
    {"io", "registry", "extras", "config"},
    {"data", "models", "robust"},
    {"runtime", "energy", "results", "metrics"},
    {"run", "predict"},
    {"ood", "explain", "sources", "conformal", "search"},
    {"training"},
    {"audit", "report", "compress"},
    {"api", "serve"},
    {"cli", "__init__"},
    {"__main__"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def part(name: str) -> str | None:
    """``pupil.audit.common`` -> ``audit``; the top-level package (``from pupil import __version__``) -> None."""
    pieces = name.split(".")
    return pieces[1] if pieces[0] == "pupil" and len(pieces) > 1 and pieces[1] != "__version__" else None


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "pupil" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {p for n in names if (p := part(n))}
    return out


def test_every_part_of_the_package_has_a_layer():
    parts = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.rglob("*.py")}
    assert parts <= set(RANK), f"give these a layer in LAYERS: {sorted(parts - set(RANK))}"


# The one import up the layers: ``pupil.audit`` is a callable package, so that ``pupil.audit(model, data)`` works
# although importing the package binds that name; its ``__call__`` hands over to ``pupil.api.audit`` at call time.
# And ``load_run`` opens a compressed run's artefact (ONNX, TorchScript, a torch.export archive) through
# ``pupil.compress.export.load_artefact``, imported when such a run is loaded: a run directory is the contract that
# lets audit and compare treat a deployed artefact like a trained model.
UPWARD = {("audit/__init__.py", "api"), ("run.py", "compress")}


def test_imports_only_go_down_the_layers():
    wrong = []
    for path in SRC.rglob("*.py"):
        here = path.relative_to(SRC).parts[0].removesuffix(".py")
        for there in imports(path) - {here}:
            if RANK[there] >= RANK[here] and (str(path.relative_to(SRC)), there) not in UPWARD:
                wrong.append(f"{path.relative_to(SRC)} imports pupil.{there}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_audit_does_not_import_training():
    for path in (SRC / "audit").rglob("*.py"):
        assert "training" not in imports(path), path
