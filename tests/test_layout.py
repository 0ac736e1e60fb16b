"""The package layout: each subpackage imports only those below it, no import circles, no TorchServe in gpt_fast."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt_fast"
# What each subpackage may import (besides itself); modules directly in gpt_fast/ are entry points: anything.
MAY_IMPORT = {
    "model": set(),
    "text": set(),
    "arch": {"model"},
    "engine": {"model", "text"},
    "checkpoints": {"model", "text", "arch"},
    "serving": {"model", "text", "engine", "checkpoints"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (`from .x import y` counts x.y when y is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / f"{base}.{alias.name}".replace(".", "/")).with_suffix(".py").is_file())
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules} for name, path in modules.items()}


def test_subpackages_import_only_those_below_them():
    wrong = []
    for name, deps in graph().items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in MAY_IMPORT:
            continue
        allowed = MAY_IMPORT[parts[1]] | {parts[1]}
        wrong += [f"{name} imports {d}" for d in deps if d != "gpt_fast" and d.split(".")[1] not in allowed]
        wrong += [f"{name} imports gpt_fast" for d in deps if d == "gpt_fast"]
    assert not wrong


def test_no_import_circles():
    edges = graph()
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for dep in edges[name]:
            if dep != name and not name.startswith(dep + "."):  # a module's own package __init__ is not a circle
                visit(dep)
        stack.pop()
        done.add(name)

    for name in edges:
        visit(name)


def test_gpt_fast_never_imports_torchserve():
    for path in PACKAGE.rglob("*.py"):
        assert not any(m == "ts" or m.startswith("ts.") for m in imports(path)), path
