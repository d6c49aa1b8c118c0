"""The package's shape: modules import each other one way only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medqa"


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports() -> dict[str, set[str]]:
    """medqa module -> the medqa modules it imports, at the top or inside functions."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medqa":
                # `from medqa.tasks import pubmedqa` imports the package and its submodule
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "medqa"}
        graph[module] = found - {module, "medqa"}
    return graph


def test_no_import_cycle():
    graph = imports()
    assert {"medqa.data", "medqa.model", "medqa.tasks", "medqa.tasks.pubmedqa", "medqa.tiny"} <= graph.keys()
    assert "medqa.tasks.pubmedqa" in graph["medqa.tasks"]  # submodule imports are edges too
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done or module not in graph:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_data_code_reads_nothing_of_the_trainer():
    """Data flows one way: file -> records -> split -> tokens -> batches -> module. No data
    module reads the Trainer's state (it keeps its own position, in its sampler)."""
    data_modules = [PACKAGE / "data.py", PACKAGE / "tokens.py", PACKAGE / "samplers.py", PACKAGE / "records.py",
                    *(PACKAGE / "tasks").glob("*.py")]
    for path in data_modules:
        for node in ast.walk(ast.parse(path.read_text())):
            touches = (isinstance(node, ast.Attribute) and node.attr == "trainer") or (
                isinstance(node, ast.Name) and node.id == "trainer")
            assert not touches, f"{path.name}:{node.lineno} reads the trainer"


def test_no_module_is_a_god_module():
    """One concern a file: none grows past 400 lines."""
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > 400}


def test_the_readme_names_nothing_a_new_user_cannot_have():
    """No project-machine paths, kits or card serial numbers: those live in benchmarks/README.md."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for pattern in (r"\.\./shared", r"gpu-kit", r"\.gpukit", r"\$PQAL", r"/tmp/", r"GPU-[0-9a-f]{8}"):
        assert not re.search(pattern, readme), pattern
    assert "benchmarks/README.md" in readme
