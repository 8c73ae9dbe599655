"""The package's layers: no module imports one of a higher layer (imports inside functions
included), and every module belongs to a layer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# low to high; a module may import its own layer and lower ones
LAYERS = [
    {"errors", "defaults", "precision", "plugins", "registry", "util", "__init__"},
    {"config"},
    {"image", "data", "sources", "report"},
    {"vision"},
    {"model"},
    {"engine"},
    {"tasks"},
    {"jobs", "worker"},
]


def _layer(parts: tuple[str, ...]) -> int:
    """Layer of ``lm4lv_core.<parts>`` (``lm4lv_cli``: above all)."""
    if parts[0] == "lm4lv_cli":
        return len(LAYERS)
    head = parts[1] if len(parts) > 1 else "__init__"
    if not ((ROOT / parts[0] / head).is_dir() or (ROOT / parts[0] / f"{head}.py").is_file()):
        head = "__init__"  # a name the package itself defines (e.g. __version__)
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{'.'.join(parts)} is in no layer; add it to LAYERS and to the code map")


def _imports(path: Path, module: tuple[str, ...]):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module[:-1] if path.name != "__init__.py" else module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + tuple((node.module or "").split(".")) if node.module else base
                names = [target + (a.name,) for a in node.names] if not node.module else [target]
            else:
                names = [tuple((node.module or "").split("."))]
            yield from names
        elif isinstance(node, ast.Import):
            yield from (tuple(a.name.split(".")) for a in node.names)


def test_no_module_imports_a_higher_layer():
    bad = []
    for pkg in ("lm4lv_core", "lm4lv_cli"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            module = tuple(rel.parts[:-1]) if rel.name == "__init__" else tuple(rel.parts)
            mine = _layer(module)
            for target in _imports(path, module):
                if target[0] in ("lm4lv_core", "lm4lv_cli") and _layer(target) > mine:
                    bad.append(f"{'.'.join(module)} imports {'.'.join(target)}")
    assert not bad, "\n".join(bad)
