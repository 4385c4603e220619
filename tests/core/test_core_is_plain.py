"""Architecture rules, read from the source with ``ast`` (nothing is imported):

- ``edge_core`` is the plain core: no broker, MQTT client, event loop, network or
  subprocess module, and none of the outer packages. ``threading`` is allowed (a lock in
  ``edge_core.events``); file I/O is allowed (``edge_core.files`` writes atomically).
- ``broker_plugins`` and ``gateway_agent`` are siblings and never import each other;
  what they share lives in ``edge_core`` or ``edge_runtime``.
- ``device_client`` imports neither ``broker_plugins`` nor ``gateway_agent``.

Every import counts, including those under ``if TYPE_CHECKING:`` or inside functions, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Modules that do network, event-loop or process I/O, or bring in the broker or a client.
CORE_FORBIDDEN = frozenset({
    "amqtt", "asyncio", "socket", "ssl", "sqlite3", "http", "urllib", "requests", "paho", "aiomqtt",
    "uvloop", "subprocess", "multiprocessing", "selectors", "socketserver", "asyncore", "aiohttp",
    "httpx", "websockets", "smtplib", "ftplib", "xmlrpc", "concurrent",
    # the outer packages: the core is used by them, never the other way round
    "broker_plugins", "gateway_agent", "edge_runtime", "device_client",
})  # fmt: skip
#: Calls that start processes, whatever the import says.
CORE_FORBIDDEN_CALLS = frozenset({
    "os.system", "os.popen", "os.fork", "os.forkpty", "os.execv", "os.execve", "os.execvp", "os.execvpe",
    "os.execl", "os.execle", "os.execlp", "os.execlpe", "os.spawnl", "os.spawnle", "os.spawnlp",
    "os.spawnlpe", "os.spawnv", "os.spawnve", "os.spawnvp", "os.spawnvpe", "os.posix_spawn", "os.posix_spawnp",
})  # fmt: skip

RULES: dict[str, frozenset[str]] = {
    "edge_core": CORE_FORBIDDEN,
    "broker_plugins": frozenset({"gateway_agent"}),
    "gateway_agent": frozenset({"broker_plugins"}),
    "device_client": frozenset({"broker_plugins", "gateway_agent"}),
}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module of ``from ...x import y`` in module ``importer``."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    return ".".join([*base, node.module] if node.module else base)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        parent = _dotted(node.value)
        return None if parent is None else f"{parent}.{node.attr}"
    return None


def imports_of(source: str, importer: str, *, is_package: bool = False) -> list[Import]:
    """Every module ``source`` imports, by absolute name, with its line."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, importer, is_package)
            if base:
                found.append(Import(base, node.lineno))
            # `from pkg import mod` may import a submodule; name it too
            found.extend(
                Import(f"{base}.{alias.name}" if base else alias.name, node.lineno)
                for alias in node.names
                if alias.name != "*"
            )
        elif (
            isinstance(node, ast.Call)
            and _dotted(node.func) in ("importlib.import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(node.args[0].value, node.lineno))
    return found


def calls_of(source: str) -> list[tuple[str, int]]:
    """Dotted names of every called attribute chain, like ``os.system``, with their line."""
    return [
        (name, node.lineno)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and (name := _dotted(node.func)) is not None
    ]


def reaches(module: str, forbidden: frozenset[str]) -> str | None:
    """The forbidden top-level package ``module`` belongs to, if any."""
    for name in forbidden:
        if module == name or module.startswith(name + "."):
            return name
    return None


def violations(package: str, forbidden: frozenset[str], root: Path = ROOT) -> list[str]:
    problems = []
    for path in sorted((root / package).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(root)
        for imported in imports_of(source, module_name(path, root), is_package=path.name == "__init__.py"):
            if reaches(imported.module, forbidden):
                problems.append(f"{where}:{imported.line}: imports {imported.module}")
        if package == "edge_core":
            problems.extend(
                f"{where}:{line}: calls {name}" for name, line in calls_of(source) if name in CORE_FORBIDDEN_CALLS
            )
    return sorted(set(problems))


# --- the rules, on the real tree ------------------------------------------------------------------


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_is_there_to_check(package: str) -> None:
    modules = list((ROOT / package).rglob("*.py"))
    assert (ROOT / package / "__init__.py").is_file()
    assert len(modules) >= 2, f"{package} has no modules; the rule below would pass vacuously"


def test_core_imports_no_io_framework_nor_outer_package() -> None:
    assert violations("edge_core", CORE_FORBIDDEN) == []


def test_core_may_use_threading_but_nothing_spawns_processes() -> None:
    # the allowance is deliberate: events.py and replay.py guard counters with a lock
    assert "threading" not in CORE_FORBIDDEN


def test_broker_does_not_reach_into_the_agent() -> None:
    assert violations("broker_plugins", RULES["broker_plugins"]) == []


def test_agent_does_not_reach_into_the_broker() -> None:
    assert violations("gateway_agent", RULES["gateway_agent"]) == []


def test_device_client_stands_alone() -> None:
    assert violations("device_client", RULES["device_client"]) == []


# --- the checker itself, on sources that break the rules ------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import asyncio\n", "asyncio"),
        ("import socket as s\n", "socket"),
        ("from ssl import SSLContext\n", "ssl"),
        ("from urllib.request import urlopen\n", "urllib.request"),
        ("import http.client\n", "http.client"),
        ("def f():\n    import subprocess\n", "subprocess"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from amqtt.session import Session\n",
            "amqtt.session",
        ),
        ("import importlib\nimportlib.import_module('paho.mqtt.client')\n", "paho.mqtt.client"),
        ("__import__('aiomqtt')\n", "aiomqtt"),
        ("from broker_plugins import settings\n", "broker_plugins"),
        ("from .. import gateway_agent\n", "gateway_agent"),
    ],
)
def test_checker_finds_a_forbidden_import(tmp_path: Path, source: str, expected: str) -> None:
    (tmp_path / "edge_core").mkdir()
    (tmp_path / "edge_core" / "__init__.py").write_text("")
    (tmp_path / "edge_core" / "bad.py").write_text(source)
    found = violations("edge_core", CORE_FORBIDDEN, root=tmp_path)
    assert len(found) >= 1
    assert found[0].startswith("edge_core/bad.py:")
    assert any(problem.endswith(f"imports {expected}") for problem in found), found


def test_checker_resolves_relative_imports(tmp_path: Path) -> None:
    package = tmp_path / "broker_plugins" / "plugins"
    package.mkdir(parents=True)
    (tmp_path / "broker_plugins" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from . import guard\n")  # broker_plugins.plugins.guard: fine
    (package / "guard.py").write_text("from ...gateway_agent.pki import FileCA\nfrom ..settings import x\n")
    assert violations("broker_plugins", RULES["broker_plugins"], root=tmp_path) == [
        "broker_plugins/plugins/guard.py:1: imports gateway_agent.pki",
        "broker_plugins/plugins/guard.py:1: imports gateway_agent.pki.FileCA",
    ]


def test_checker_finds_process_calls_in_the_core(tmp_path: Path) -> None:
    (tmp_path / "edge_core").mkdir()
    (tmp_path / "edge_core" / "shell.py").write_text("import os\n\nos.system('ls')\nos.replace('a', 'b')\n")
    assert violations("edge_core", CORE_FORBIDDEN, root=tmp_path) == ["edge_core/shell.py:3: calls os.system"]


def test_checker_allows_threading_files_and_lookalike_names(tmp_path: Path) -> None:
    (tmp_path / "edge_core").mkdir()
    (tmp_path / "edge_core" / "fine.py").write_text(
        "import threading\nimport os\nimport tempfile\nfrom edge_core import sockets_policy\nimport httpdate_like\n"
    )
    assert violations("edge_core", CORE_FORBIDDEN, root=tmp_path) == []
