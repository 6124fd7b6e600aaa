"""The house rules a reader relies on, checked on the source: imports run one way (ops <- models <- parallel <-
train <- integrations, recipes), nothing edits `sys.path`, `parallel/` learns a model's layout from the model
protocol and never asks `isinstance` of a model class, and no function runs past a screen."""

from __future__ import annotations

import ast
import pathlib

from helpers import ROOT

ROOT_PATH = pathlib.Path(ROOT)
# Folder (relative to the repository root) -> import name of the package it holds.
PACKAGES = {"dtllama": "dtllama", "ops": "dtllama.ops", "parallel": "dtllama.parallel"}
# Layers, lowest first: a module may import from its own layer and those below.
LAYERS = [
    ("dtllama.compat", "dtllama.fsutil"),
    ("dtllama.ops",),
    ("dtllama.models", "dtllama"),  # the package's own __init__ exports the models' API
    ("dtllama.parallel",),
    ("dtllama.train",),
    ("dtllama.integrations", "recipes"),
]
MAX_FUNCTION_LINES = 60


def _layer(module: str) -> int:
    """The layer of a dotted module name: its longest matching prefix."""
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    if level is None:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYERS in tests/test_layers.py")
    return level


def _sources() -> list[tuple[pathlib.Path, str]]:
    """Every source file of the library and the recipes with its module name."""
    out = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT_PATH / folder).rglob("*.py")):
            parts = path.relative_to(ROOT_PATH / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out.append((path, ".".join((package, *parts))))
    for path in sorted((ROOT_PATH / "recipes").glob("*.py")):
        out.append((path, f"recipes.{path.stem}"))
    return out


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth (imports inside functions count)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
    return found


def test_imports_run_one_way():
    recipe_names = {p.stem for p in (ROOT_PATH / "recipes").glob("*.py")}
    bad = []
    for path, module in _sources():
        own = _layer(module)
        tree = ast.parse(path.read_text())
        for line, target in _imports(tree, module, path.name == "__init__.py"):
            where = f"{path.relative_to(ROOT_PATH)}:{line}"
            if target.split(".")[0] in recipe_names and module.startswith("recipes."):
                bad.append(f"{where} imports the recipe {target!r}: shared code belongs in dtllama.train")
            elif target.split(".")[0] == "dtllama" and _layer(target) > own:
                bad.append(f"{where} ({module}, layer {own}) imports {target} (layer {_layer(target)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_nothing_edits_sys_path():
    bad = []
    for path, _ in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                bad.append(f"{path.relative_to(ROOT_PATH)}:{node.lineno}")
    assert not bad, "sys.path used at " + ", ".join(bad)


def _model_names(tree: ast.AST) -> set[str]:
    """Names a file imports from `dtllama.models` (model classes, configs, ...), but the model protocol's."""
    names = set()
    for node in ast.walk(tree):
        module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
        if module.startswith("dtllama.models") and module != "dtllama.models.protocol":
            names |= {a.asname or a.name for a in node.names if a.name != "protocol"}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("dtllama.models")}
    return names


def test_parallel_asks_the_protocol_not_isinstance():
    bad = []
    for path in sorted((ROOT_PATH / "parallel").rglob("*.py")):
        tree = ast.parse(path.read_text())
        models = _model_names(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
                used = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                used |= {n.value.id for n in ast.walk(node.args[1])
                         if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
                if used & models:
                    bad.append(f"{path.relative_to(ROOT_PATH)}:{node.lineno} isinstance of {sorted(used & models)}")
    assert not bad, "parallel/ guesses the family:\n" + "\n".join(bad)


def test_functions_fit_a_screen():
    long = []
    for path, _ in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT_PATH)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checks above fail on a file that breaks them (a test that cannot fail proves nothing)."""
    tree = ast.parse("from dtllama.train.data import first_fit\nimport sys\nsys.path.insert(0, 'x')\n")
    assert _imports(tree, "dtllama.ops.packing", False) == [(1, "dtllama.train.data"), (2, "sys")]
    assert _layer("dtllama.train.data") > _layer("dtllama.ops.packing")
    rel = ast.parse("from ..models.llama import LlamaForCausalLM\nfrom . import tp\n")
    assert _imports(rel, "dtllama.parallel.cp", False) == [(1, "dtllama.models.llama"), (2, "dtllama.parallel")]
    assert _imports(rel, "dtllama.parallel", True)[1] == (2, "dtllama.parallel")
    assert _model_names(ast.parse("from dtllama.models.llama import LlamaForCausalLM")) == {"LlamaForCausalLM"}
    assert _model_names(ast.parse("from dtllama.models import protocol as P")) == set()
