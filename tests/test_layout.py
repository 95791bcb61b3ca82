"""The layout's rules, read from the code's imports (as dramatiq's brokers never import each
other): the services are peers over ``shared/``, ``shared/`` serves them all and imports none,
and no module imports itself back through a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.servers import ROOT

SERVICES = ("collector", "enabler", "api")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str | None = None) -> set[str]:
    """Every module ``path`` (module ``name``) imports: absolute names, relative resolved."""
    tree = ast.parse(path.read_text(), str(path))
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def product_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for folder in ("services", "shared")
        for p in sorted((ROOT / folder).rglob("*.py"))
    }


def owner(module: str) -> str | None:
    """The service (or ``shared``) a module belongs to."""
    parts = module.split(".")
    if parts[0] == "shared":
        return "shared"
    if parts[0] == "services" and len(parts) > 1 and parts[1] in SERVICES:
        return parts[1]
    return None


@pytest.mark.parametrize("service", SERVICES)
def test_services_are_peers(service: str) -> None:
    """A service imports ``shared`` and itself, never another service."""
    wrong = {
        (name, target)
        for name, path in product_modules().items()
        if owner(name) == service
        for target in imports(path)
        if owner(target) not in (None, "shared", service)
    }
    assert not wrong, sorted(wrong)


def test_shared_imports_no_service() -> None:
    wrong = {
        (name, target)
        for name, path in product_modules().items()
        if owner(name) == "shared"
        for target in imports(path)
        if target.startswith("services")
    }
    assert not wrong, sorted(wrong)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_circles() -> None:
    """Among the product's modules, the benchmarks', the tests' and the tools'."""
    modules = {
        **product_modules(),
        **{
            module_name(p): p
            for f in ("bench", "tests", "tools")
            for p in sorted((ROOT / f).rglob("*.py"))
        },
    }
    graph = {
        name: {t for t in imports(path) if t in modules and t != name}
        for name, path in modules.items()
    }
    assert not circles(graph), circles(graph)


def test_the_checks_see_a_cross_service_import(tmp_path: Path) -> None:
    """The reader finds what the rules forbid (so the tests above can fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from services.enabler import writes\nfrom . import workers\n")
    found = imports(probe, "services.api.probe")
    assert "services.enabler.writes" in found and "services.api.workers" in found
    assert owner("services.enabler.writes") == "enabler"
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tests_share_only_through_support() -> None:
    """A test module imports from ``tests.support`` or from its own folder, never from another
    test folder; ``bench`` and ``tools`` reach the tests only through ``tests.support``."""
    wrong = set()
    for folder in ("tests", "bench", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = module_name(path)
            parts = name.split(".")
            own = ".".join(parts[:2]) if folder == "tests" and len(parts) > 2 else None
            for target in imports(path, name):
                if not target.startswith("tests.") or target.startswith("tests.support"):
                    continue
                if own is None or not (target == own or target.startswith(own + ".")):
                    wrong.add((name, target))
    assert not wrong, sorted(wrong)
