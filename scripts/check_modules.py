"""The package's size and privacy rules, run by `make lint` beside import-linter's layers:
no module of `diffusion` over MAX_LINES lines, and no private name (`_x`) of one module used by
another, imported (`from diffusion.a import _x`) or reached through a module (`a._x`).

    python scripts/check_modules.py   # exits 1 and lists every breach
"""

from __future__ import annotations

import ast
import pathlib
import sys

MAX_LINES = 600
PACKAGE = "diffusion"


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def in_package(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def breaches(path: pathlib.Path) -> list[str]:
    text = path.read_text()
    found = []
    if len(text.splitlines()) > MAX_LINES:
        found.append(f"{path}: {len(text.splitlines())} lines (at most {MAX_LINES}: split it)")
    tree = ast.parse(text)
    package_names = set()  # names this module binds to the package's modules and objects
    for node in ast.walk(tree):
        # A relative import (level > 0) is always one of the package's own.
        if isinstance(node, ast.ImportFrom) and (node.level or in_package(node.module or "")):
            for alias in node.names:
                if is_private(alias.name):
                    found.append(f"{path}:{node.lineno}: imports {node.module}.{alias.name}")
                package_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if in_package(alias.name):
                    package_names.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in package_names
        ):
            found.append(f"{path}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return found


def main() -> int:
    found = [b for path in sorted(pathlib.Path(PACKAGE).rglob("*.py")) for b in breaches(path)]
    for breach in found:
        print(breach)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
