"""The two layers point one way: nanogpt/ is plain PyTorch + NumPy and never pulls in ray or mlflow."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

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
    import ast

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
