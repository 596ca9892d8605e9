"""The package's modules import one way: no cycle among them, and no import of one inside a function (which
would only hide a cycle)."""

import ast
from pathlib import Path

import gptoss_dist

PACKAGE = Path(gptoss_dist.__file__).parent
MODULES = {f"gptoss_dist.{path.stem}": path for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def imported_modules(node: ast.AST) -> set[str]:
    """The package's modules that an import statement names (`from gptoss_dist import x` names module x)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    if isinstance(node, ast.ImportFrom) and node.module == "gptoss_dist":
        return {f"gptoss_dist.{alias.name}" for alias in node.names} & set(MODULES)
    if isinstance(node, ast.ImportFrom) and node.module in MODULES:
        return {node.module}
    return set()


def module_imports(path: Path) -> tuple[set[str], set[str]]:
    """(imported at the top level, imported inside a function) of one module."""
    top, inner = set(), set()
    tree = ast.parse(path.read_text())
    for statement in tree.body:
        top |= imported_modules(statement)
        if isinstance(statement, ast.If | ast.Try):  # `if TYPE_CHECKING:` and the like still run at import
            top |= {m for node in ast.walk(statement) for m in imported_modules(node)}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inner |= {m for node in ast.walk(function) for m in imported_modules(node)}
    return top, inner


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    return next((cycle for module in sorted(graph) if module not in state and (cycle := visit(module))), None)


def test_the_walk_finds_a_cycle_and_a_function_level_import(tmp_path):
    source = tmp_path / "a.py"
    source.write_text("from gptoss_dist.model import GptOss\n\ndef f():\n    from gptoss_dist import sharding\n")
    assert module_imports(source) == ({"gptoss_dist.model"}, {"gptoss_dist.sharding"})
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_and_no_function_level_import():
    graph, inner = {}, {}
    for module, path in MODULES.items():
        graph[module], inner[module] = module_imports(path)
    assert {module: found for module, found in inner.items() if found} == {}
    assert find_cycle(graph) is None


def test_the_mesh_rules_know_nothing_of_the_model():
    graph = {module: module_imports(path)[0] for module, path in MODULES.items()}
    reached, frontier = set(), {"gptoss_dist.sharding"}
    while frontier:
        reached |= frontier
        frontier = {target for module in frontier for target in graph[module]} - reached
    assert "gptoss_dist.model" not in reached
