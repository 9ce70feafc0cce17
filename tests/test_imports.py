"""The import rules, read from the source with `ast` (imports inside functions included), and the public API.

- the core knows nothing of memory, agents, eval, train or the LangChain tools;
- only the LangChain adapter (and the memory's retriever, the chat-model backend) imports LangChain;
- only the MCP server imports fastmcp/mcp; only the memory store imports chromadb;
- no module imports a module that imports it back, directly or through others (imports under
  ``if TYPE_CHECKING:`` never run, so they do not make a cycle; they still count for the other rules).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import df_agent
import df_agent.tools

ROOT = Path(__file__).resolve().parents[1]
# where each installed package's source lives (pyproject.toml: tools/ installs as df_agent.tools)
SOURCES = {"df_agent": ROOT / "df_agent", "df_agent.tools": ROOT / "tools"}

CORE = (
    "df_agent.engine", "df_agent.results", "df_agent.boxes", "df_agent.images", "df_agent.prompt_sets",
    "df_agent.observers", "df_agent.calibration", "df_agent.visualize", "df_agent.backends",
    "df_agent.frames", "df_agent.search",
)  # fmt: skip
ABOVE_THE_CORE = ("df_agent.memory", "df_agent.agents", "df_agent.eval", "df_agent.train", "df_agent.tools")
# third-party packages only some modules may import: the package's top-level names -> who may
ONLY_IN = {
    # LangChain itself; a partner package (langchain_openai) building a chat model at a CLI's edge is not
    ("langchain", "langchain_core"): (
        "df_agent.tools", "df_agent.memory.retriever", "df_agent.backends.chat_model",
    ),
    ("fastmcp", "mcp"): ("df_agent.agents.mcp",),
    ("chromadb",): ("df_agent.memory.store",),
}  # fmt: skip
# cycles allowed for now, each with the reason; none
ALLOWED_CYCLES: list[set[str]] = []


def modules() -> dict[str, Path]:
    """Every module of the installed packages, by dotted name."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = modules()


def typing_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found |= {n for child in node.body for n in ast.walk(child)}
    return found


def imported(name: str, path: Path) -> Iterator[tuple[str, int, bool]]:
    """Every module `name` imports (anywhere in the file): the module, the line, whether it is typing only.

    Relative imports are resolved.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for_typing = typing_only(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, node in for_typing
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from package import module` imports the module; `from module import name` the module
                module = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                yield module, node.lineno, node in for_typing


IMPORTS = {name: sorted(set(imported(name, path))) for name, path in MODULES.items()}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_module_list_is_complete() -> None:
    assert {"df_agent.engine", "df_agent.agents.specs", "df_agent.tools.toolkit"} <= set(MODULES)
    assert all(within(name, ("df_agent",)) for name in MODULES)


def test_the_core_imports_nothing_above_it() -> None:
    bad = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
        for name in MODULES
        if within(name, CORE)
        for target, line, _ in IMPORTS[name]
        if within(target, ABOVE_THE_CORE)
    ]
    assert not bad, "the core must not import memory, agents, eval, train or tools:\n" + "\n".join(bad)


@pytest.mark.parametrize("packages", list(ONLY_IN), ids=lambda p: p[0])
def test_integrations_are_imported_only_by_their_adapters(packages: tuple[str, ...]) -> None:
    allowed = ONLY_IN[packages]
    bad = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
        for name in MODULES
        if not within(name, allowed)
        for target, line, _ in IMPORTS[name]
        if target.split(".")[0] in packages
    ]
    assert not bad, f"only {', '.join(allowed)} may import {', '.join(packages)}:\n" + "\n".join(bad)


def cycles() -> list[set[str]]:
    """The strongly connected components of the import graph with more than one module (Tarjan)."""
    graph = {
        name: {t for t, _, typing in IMPORTS[name] if t in MODULES and t != name and not typing}
        for name in MODULES
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    found = [sorted(c) for c in cycles() if c not in ALLOWED_CYCLES]
    assert not found, "import cycles (imports inside functions count too):\n" + "\n".join(map(str, found))


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import(monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = ("df_agent.engine", 1, False)
    monkeypatch.setitem(IMPORTS, "df_agent.boxes", [*IMPORTS["df_agent.boxes"], lazy])
    assert any({"df_agent.boxes", "df_agent.engine"} <= c for c in cycles())


def test_imports_are_read_inside_functions_and_under_type_checking() -> None:
    store = IMPORTS["df_agent.memory.store"]
    assert any(target == "chromadb" and not typing for target, _, typing in store)  # a lazy import
    mcp = IMPORTS["df_agent.agents.mcp"]
    assert ("fastmcp", True) in {(target, typing) for target, _, typing in mcp}


# -- the public API, frozen ------------------------------------------------------------------------


def test_the_public_api_of_df_agent() -> None:
    assert sorted(df_agent.__all__) == sorted(PUBLIC_DF_AGENT)
    assert all(getattr(df_agent, name) is not None for name in df_agent.__all__)


def test_the_public_api_of_df_agent_tools() -> None:
    assert sorted(df_agent.tools.__all__) == [
        "ArbitrateAnswersTool", "DualFocusAnswerTool", "DualFocusTool", "DualFocusToolkit",
        "FocusedAnswerTool", "GlobalAnswerTool", "RecallVisualQATool", "ZoomRegionTool",
    ]  # fmt: skip
    assert all(getattr(df_agent.tools, name) is not None for name in df_agent.tools.__all__)


PUBLIC_DF_AGENT = [
    "Arbitration", "Backend", "Box", "BoxConvention", "Conversation", "DualFocus", "FocusResult",
    "ImageError", "Location", "NoBox", "Turn", "Zoom", "__version__", "load_image",
]  # fmt: skip
