"""The floors of the code base (docs/architecture.md), checked by walking every import with ``ast``.

A module may import the floors below its own and the modules of its own
folder; never a floor above, and never a sibling floor (client and server
know nothing of each other). Nothing imports the windows or the programs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The users' own modules at the top: the foundation every floor may use.
FOUNDATION = ("error_handler", "config_loader", "logger_config", "integrity", "database", "metrics")
PROGRAMS = ("main_server", "backup_server", "client", "demo")

# floor name -> height; floors of the same height are siblings and may not import each other.
FLOORS = {
    "foundation": 0,
    "minitorrent.common": 1,
    "minitorrent.wire": 2,
    "minitorrent.net": 3,
    "minitorrent.client": 4,
    "minitorrent.server": 4,
    "minitorrent.gui": 5,
    "minitorrent.web": 5,
    "programs": 6,
}


def floor_of(module: str) -> str | None:
    """The floor a dotted module name belongs to; None for the standard library and third parties."""
    top = module.split(".")[0]
    if top in FOUNDATION:
        return "foundation"
    if top in PROGRAMS:
        return "programs"
    if top == "minitorrent":
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else "minitorrent"
    return None


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, including those inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # ``from minitorrent import gui`` names a floor through the package itself
            if node.module == "minitorrent":
                found.extend((node.lineno, f"minitorrent.{alias.name}") for alias in node.names)
    return found


def layering_violations(path: Path) -> list[str]:
    """Every import in ``path`` that breaks the floor rules, as readable lines."""
    importer = module_name(path)
    mine = floor_of(importer)
    problems = []
    for line, target in imported_modules(path):
        theirs = floor_of(target)
        if theirs is None or theirs == mine or theirs == "minitorrent":
            continue
        if FLOORS[theirs] >= FLOORS[mine]:
            problems.append(f"{path.relative_to(ROOT)}:{line}: {importer} ({mine}) imports {target} ({theirs})")
    return problems


def code_files() -> list[Path]:
    files = [ROOT / f"{name}.py" for name in FOUNDATION + PROGRAMS]
    files += sorted((ROOT / "minitorrent").rglob("*.py"))
    return files


class TestFloors:
    def test_every_floor_of_the_package_is_known(self):
        """Each folder of the package is a floor with a height (a new folder must be placed)."""
        folders = {f"minitorrent.{p.name}" for p in (ROOT / "minitorrent").iterdir()
                   if p.is_dir() and (p / "__init__.py").exists()}
        assert set() == folders - set(FLOORS)

    @pytest.mark.parametrize("path", code_files(), ids=lambda p: str(p.relative_to(ROOT)))
    def test_no_module_imports_a_floor_above_or_beside_its_own(self, path):
        """A lower floor never imports a higher one, siblings never import each other."""
        assert [] == layering_violations(path)


class TestTheCheckItself:
    """The walk must catch what it is there to catch, or the floors above prove nothing."""

    def test_an_upward_import_is_reported(self, tmp_path, monkeypatch):
        """A wire module importing the client floor is a violation."""
        fake = ROOT / "minitorrent" / "wire" / "_probe_upward.py"
        monkeypatch.setattr(Path, "read_text", lambda self, encoding=None:
                            "from minitorrent.client.engine import ClientEngine\n")
        assert 1 == len(layering_violations(fake))

    def test_a_sibling_import_inside_a_function_is_reported(self, monkeypatch):
        """A server module reaching into the client floor, even lazily, is a violation."""
        fake = ROOT / "minitorrent" / "server" / "_probe_sibling.py"
        monkeypatch.setattr(Path, "read_text", lambda self, encoding=None:
                            "def f():\n    from minitorrent.client import downloader\n")
        assert 1 == len(layering_violations(fake))

    def test_the_foundation_may_not_import_the_package(self, monkeypatch):
        """database.py importing the server floor is a violation."""
        fake = ROOT / "database.py"
        monkeypatch.setattr(Path, "read_text", lambda self, encoding=None:
                            "from minitorrent.server import catalog\n")
        assert 1 == len(layering_violations(fake))

    def test_a_downward_import_is_allowed(self, monkeypatch):
        """The client floor may use the network core and the foundation."""
        fake = ROOT / "minitorrent" / "client" / "_probe_down.py"
        monkeypatch.setattr(Path, "read_text", lambda self, encoding=None:
                            "import database\nfrom minitorrent.net import remote\n")
        assert [] == layering_violations(fake)
