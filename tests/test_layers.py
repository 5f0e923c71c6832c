"""The code map's rules (ARCHITECTURE.md), checked on the source: what each folder may import, and
that the server's adapters reach the state through the scheduler only."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# Folder → the jobwire packages its modules may import (`jobwire` alone is the SDK's modules; the
# package root itself, for `__version__`, is always allowed). Keep in step with ARCHITECTURE.md.
MAY_IMPORT = {
    "core": {"jobwire.core", "jobwire.v1"},
    "sdk": {"jobwire", "jobwire.core", "jobwire.v1"},
    "server": {"jobwire.server", "jobwire.core", "jobwire.v1"},
    "worker": {"jobwire.worker", "jobwire", "jobwire.core", "jobwire.v1"},
    "envoy": {"jobwire.envoy", "jobwire.v1"},
    "agents": {"jobwire.agents", "jobwire", "jobwire.core", "jobwire.v1"},
}
SUBPACKAGES = (
    "jobwire.core",
    "jobwire.server",
    "jobwire.worker",
    "jobwire.cli",
    "jobwire.envoy",
    "jobwire.agents",
    "jobwire.v1",
)
# Modules that adapt a protocol to the scheduler: they hold no store and no bus.
ADAPTERS = [*sorted((ROOT / "server" / "servicers").glob("*.py")), ROOT / "server" / "sessions.py"]


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _package(module: str) -> str | None:
    """The layer a jobwire module belongs to (`jobwire` for the SDK's own modules), None if not ours."""
    if module != "jobwire" and not module.startswith("jobwire."):
        return None
    return next(
        (package for package in SUBPACKAGES if module == package or module.startswith(f"{package}.")), "jobwire"
    )


@pytest.mark.parametrize("folder", sorted(MAY_IMPORT))
def test_each_folder_imports_only_the_layers_below_it(folder: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in _imports(path)
        if module != "jobwire" and (package := _package(module)) is not None and package not in MAY_IMPORT[folder]
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", ADAPTERS, ids=lambda path: path.name)
def test_adapters_reach_the_state_only_through_the_scheduler(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    wrong = [
        f"line {line}: imports {module}" for line, module in _imports(path) if module.startswith("jobwire.server.store")
    ]
    wrong += [
        f"line {node.lineno}: touches .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("store", "bus")
    ]
    assert not wrong, f"{path.relative_to(ROOT)} must call the scheduler, not the store or the bus:\n" + "\n".join(
        wrong
    )


def test_the_rules_see_the_code() -> None:
    """The checks above would pass on an empty tree: make sure they read the modules they guard."""
    assert any(module == "jobwire.server.scheduler" for path in ADAPTERS for _, module in _imports(path))
    assert len(list((ROOT / "server").rglob("*.py"))) > 20


# Third-party clients each kept behind one seam: module prefix → the files that may import it.
CONFINED = {
    "docker": {"worker/docker_runtime.py", "worker/docker_output.py"},
    "grpc": {"server/app.py", "server/errors.py", *(f"server/servicers/{path.name}" for path in ADAPTERS[:-1])},
}


@pytest.mark.parametrize("client", sorted(CONFINED))
def test_engine_and_transport_clients_stay_behind_their_seams(client: str) -> None:
    folders = {"docker": ["worker"], "grpc": ["server"]}[client]
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in _imports(path)
        if (module == client or module.startswith(f"{client}.")) and str(path.relative_to(ROOT)) not in CONFINED[client]
    ]
    assert not wrong, "\n".join(wrong)
