"""The store's two layers point one way (docs/architecture.md, "Layers"):
engine/storage.py moves bytes by key and knows nothing of the layout that
engine/store.py puts on top of it. Read from the source, so an import
inside a function or a key spelt out in code counts as much as a
module-level import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine import storage as storages
from engine import store as layout

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("engine", "preprocess", "trainers", "common", "benchmarks")


def source_tree(module: str) -> ast.Module:
    return ast.parse((ROOT / module).read_text(), filename=module)


def imported_modules(tree: ast.Module) -> set[str]:
    """Every module an import anywhere in `tree` names (a relative import
    counts as the project's own)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def code_strings(tree: ast.Module) -> set[str]:
    """The string constants of `tree`'s code, docstrings left out (they may
    say which layer sits above)."""
    docstrings = {id(body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and (body := node.body) and isinstance(body[0], ast.Expr)
                  and isinstance(body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings}


def layout_names() -> set[str]:
    """What only the layout layer may name: the arrays and groups, the root's
    files and attributes."""
    return ({*layout.PIXEL_ARRAY_DEPTHS, "meta", "instances", *layout.MINING_KINDS,
             *layout.META_SCHEMA, *layout.INSTANCE_ARRAYS, *layout.COMPLETION,
             "zarr.json", layout.REPORT, layout.BUILD_LOCK, layout.FORMAT}
            - {"version", "format"})   # too plain to be the layout's own


def test_the_storage_layer_imports_nothing_of_the_project():
    project = {name for name in imported_modules(source_tree("engine/storage.py"))
               if name.startswith(".") or name.split(".")[0] in PROJECT_PACKAGES}
    assert not project, f"engine/storage.py imports {sorted(project)}: the bytes layer sits below them"


def test_the_storage_layer_names_nothing_of_the_layout():
    names = layout_names()
    leaked = sorted(text for text in code_strings(source_tree("engine/storage.py"))
                    if names & set(text.split("/")))
    assert not leaked, f"engine/storage.py spells out the store's layout: {leaked}"


def test_the_checks_see_a_layer_crossed():
    """The checks above fail on what they guard against: a storage module that
    imports the layout and reads a root attribute by name."""
    crossing = ast.parse("from engine import store\n"
                         "def generation(storage):\n"
                         "    '''zarr.json in a docstring is allowed'''\n"
                         "    return json.loads(storage.read('zarr.json'))['attributes']['build_id']\n")
    assert "engine.store" in imported_modules(crossing)
    assert code_strings(crossing) == {"zarr.json", "attributes", "build_id"}
    assert {"zarr.json", "build_id"} <= layout_names()


def test_a_cached_read_is_never_made_without_the_generation_of_its_bytes(tmp_path):
    """The layout hands the cache the build id that names its folders; a
    caller that forgets it is refused instead of silently reading uncached."""
    settings = storages.StorageSettings(cache=tmp_path / "cache")
    with pytest.raises(ValueError, match="a cached read needs the generation"):
        storages.open_storage("memory://bucket/store.zarr", storage=settings)
    cached = storages.open_storage("memory://bucket/store.zarr", storage=settings,
                                   generation=lambda inner: "abc")
    assert isinstance(cached, storages.CachedStorage)
    # writing (a build) and settings without a cache need no generation
    assert isinstance(storages.open_storage("memory://bucket/store.zarr", read_only=False,
                                            storage=settings), storages.ZarrStorage)
    assert isinstance(storages.open_storage("memory://bucket/store.zarr"), storages.ZarrStorage)
