"""The two layers point one way: nanogpt/ is plain PyTorch + NumPy and never pulls in ray or mlflow; and Ray's
internals stay in one guarded wing (pipelines/ray_adapter/lean/)."""

from __future__ import annotations

import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nanogpt

ROOT = Path(__file__).resolve().parents[1]


def test_importing_every_nanogpt_module_pulls_in_neither_ray_nor_mlflow():
    modules = [m.name for m in pkgutil.walk_packages(nanogpt.__path__, "nanogpt.")]
    assert {"nanogpt.config", "nanogpt.train.loop", "nanogpt.data.shards", "nanogpt.checkpoint.format"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"nanogpt imports {out.stdout.strip()}"


def test_no_exec_eval_or_unsafe_torch_load_in_the_code():
    offenders = []
    for path in source_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(f"{fn}(" in code and f".{fn}(" not in code and f"_{fn}(" not in code for fn in ("exec", "eval")):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []


MAX_LINES = 500


def test_no_source_file_is_over_500_lines():
    """A file a reader can hold in mind: one job per module keeps each well under this."""
    long = {str(p.relative_to(ROOT)): n for p in source_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


MEASURED_FIGURE = re.compile(r"(about|~) ?[0-9][0-9.,]* ?(s|ms|seconds|%)([^a-zA-Z0-9]|$)|measured on [0-9]|"
                             r"[0-9]% (faster|slower)")
FIGURE_FREE = ("nanogpt", "pipelines")


def test_code_says_why_and_leaves_measured_figures_to_bench_notes():
    """Timings and speed-ups go stale with the next torch, Ray or tiktoken release: comments and docstrings say why
    a choice was made and point at bench/NOTES.md, where each figure has its machine and its date."""
    files = [p for p in source_files() if str(p.relative_to(ROOT)).startswith(FIGURE_FREE)]
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
             for n, line in enumerate(p.read_text().splitlines(), 1) if MEASURED_FIGURE.search(line)]
    assert found == []


def source_files() -> list[Path]:
    return sorted([*ROOT.glob("nanogpt/**/*.py"), *ROOT.glob("pipelines/**/*.py")])


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in its file, function bodies included}."""
    graph: dict[str, set[str]] = {}
    modules = {module_name(path) for path in source_files()}
    for path in source_files():
        module = module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found |= {n for n in names if n in modules}
        graph[module] = found - {module}
    return graph


def test_no_import_cycle_and_arrows_point_into_nanogpt():
    graph = project_imports()
    assert {m for m in graph if m.startswith("nanogpt.") and any(d.startswith("pipelines.") for d in graph[m])} == set()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + (module,))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


LEAN_WING = ROOT / "pipelines" / "ray_adapter" / "lean"
PRIVATE = ("_internal", "_private")


def private_ray_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each use of Ray's internals in a module: an import or attribute chain of ray through an
    `_internal` or `_private` module, a dotted string naming one (a logger, a patch target), and an assignment
    into anything reached from ray (a module's attribute, a class of Ray's)."""
    ray_names = {"ray"}  # names bound to ray or to something imported from it
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            ray_names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "ray"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            ray_names |= {a.asname or a.name for a in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_private_ray(a.name)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if _is_private_ray(n)]
        elif isinstance(node, ast.Attribute) and (chain := _dotted(node)) and chain.split(".")[0] in ray_names:
            if any(part in PRIVATE for part in chain.split(".")):
                found.append((node.lineno, chain))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_private_ray(node.value):
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in [t for tt in targets for t in (tt.elts if isinstance(tt, ast.Tuple) else [tt])]:
                chain = _dotted(target) if isinstance(target, (ast.Attribute, ast.Subscript)) else None
                if chain and chain.split(".")[0] in ray_names:
                    found.append((node.lineno, f"{chain} = ..."))
    return found


def _is_private_ray(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "ray" and all(p.isidentifier() for p in parts) and any(p in PRIVATE for p in parts)


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for an attribute chain (or a subscript of one) rooted at a name; None otherwise."""
    parts = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def test_rays_internals_are_used_only_in_the_lean_wing():
    """Every job outside the wing runs on Ray's public API: a Ray release that moves its internals breaks the wing
    only, which its version guard then leaves out (pipelines/ray_adapter/lean/__init__.py)."""
    offenders = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in source_files()
                 if LEAN_WING not in path.parents for line, what in private_ray_uses(ast.parse(path.read_text()))]
    assert offenders == []


@pytest.mark.parametrize("code, found", [
    ("from ray.train.v2._internal.util import x", ["ray.train.v2._internal.util.x"]),
    ("import ray._private.services", ["ray._private.services"]),
    ("import ray\nray._private.worker._global_node", ["ray._private.worker._global_node", "ray._private.worker",
                                                     "ray._private"]),
    ("import ray\nray.util.x = 1", ["ray.util.x = ..."]),
    ("from ray.train import Node\nNode.start = f", ["Node.start = ..."]),
    ("import ray.train as rt\nrt.a, b = 1, 2", ["rt.a = ..."]),
    ("logging.getLogger('ray._private.authentication.setup')", ["'ray._private.authentication.setup'"]),
    ("import ray\nray.init(address='local')\nx = ray.train\nlogging.getLogger('ray.train')", []),
    ("'see ray/train/v2/_internal/util.py'", []),
])
def test_the_scan_finds_each_kind_of_use(code, found):
    assert sorted(what for _, what in private_ray_uses(ast.parse(code))) == sorted(found)


def private_torch_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Imports of a torch name or module that starts with an underscore (`from torch.x import _y`, `import
    torch._x`): the code runs on torch's public API, so a torch release cannot break it by moving its internals."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "torch"]
        else:
            continue
        found += [(node.lineno, n) for n in names if any(part.startswith("_") for part in n.split("."))]
    return found


def test_no_private_torch_name_is_imported():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in source_files()
                 for line, what in private_torch_imports(ast.parse(path.read_text()))]
    assert offenders == []
    caught = private_torch_imports(ast.parse("from torch.distributed.checkpoint.state_dict_loader import _load_state_dict"
                                             "\nimport torch._dynamo\nfrom torch.nn import functional"))
    assert [what for _, what in caught] == ["torch.distributed.checkpoint.state_dict_loader._load_state_dict",
                                            "torch._dynamo"]
