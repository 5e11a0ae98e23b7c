"""The package's floors (docs/architecture.md): every import, lazy ones included, points to a
module on the same floor or below, and no modules import each other in a circle."""

import ast
import pathlib

import pytest

import clipjax

PACKAGE = pathlib.Path(clipjax.__file__).parent

# Bottom to top. A name stands for the module or the package of that name and everything in
# it, unless a longer name places part of it elsewhere.
FLOORS = [
    [
        "errors",
        "paths",
        "sharding",
        "metrics",
        "summary",
        "lock",
        "bookkeeping",
        "checkpoint",
        "distributed",
    ],
    ["models", "losses", "nn_queue", "optimizers"],
    ["data", "objectives", "weights", "evaluate"],  # evaluate: its kinds, not what runs them
    ["config", "step"],
    [
        "train",
        "inference",
        "evaluate.evaluator",
        "evaluate.checkpoint_eval",
        "evaluate.saved_config",
    ],
    ["main", "bench", "plan", "study", "report", "export", "predict", "evaluate.__main__", "tools"],
]


def _modules() -> dict[str, pathlib.Path]:
    """'evaluate.zeroshot' -> its file, for every module below clipjax/ (the package's own
    `__init__` left out: it only defers to `inference`)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _floor(module: str) -> int:
    best, floor = -1, None
    for index, names in enumerate(FLOORS):
        for name in names:
            covers = module == name or module.startswith(name + ".")
            if covers and len(name) > best:
                best, floor = len(name), index
    if floor is None:
        raise AssertionError(f"clipjax.{module} is on no floor: add it to FLOORS")
    return floor


def _imports(module: str) -> set[str]:
    """The clipjax modules that `module` imports, anywhere in its file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".") if package else []
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(["clipjax", *parent, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # `from clipjax.data import sources` imports a module; `from clipjax.x import f`, x.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "clipjax" or not name.startswith("clipjax."):
                continue
            name = name.removeprefix("clipjax.")
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_to_the_same_floor_or_below(module):
    upward = [
        f"clipjax.{m} (floor {_floor(m) + 1})" for m in GRAPH[module] if _floor(m) > _floor(module)
    ]
    assert not upward, f"clipjax.{module} (floor {_floor(module) + 1}) imports {upward}"


def test_no_modules_import_each_other_in_a_circle():
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("circle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        path.append(module)
        for other in sorted(GRAPH[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_the_checker_sees_lazy_and_relative_imports():
    """The trainer loads `init_from` weights with a lazy import of `inference`; the weights
    loader no longer imports the trainer back."""
    assert "inference" in GRAPH["train"]
    assert "train" not in GRAPH["inference"]
    assert {"zeroshot", "retrieval", "linear_probe"} <= {
        m.rpartition(".")[2] for m in GRAPH["evaluate"]
    }
