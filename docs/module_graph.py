"""Draw the import graph of the `mgn` package: one box per module, an arrow from each module to what it
imports (top-level and in-function imports alike), modules placed in layers so that every arrow points down; a
cycle would have no such placement and is reported instead. Also the rule the subpackages keep: imports point
one way, down LAYERS (each package's __init__ says what it may import); `back_edges` lists those that do not.

    python docs/module_graph.py                      # this checkout -> docs/modules.png
    python docs/module_graph.py OLD_CHECKOUT out.png  # any other checkout, e.g. to compare before and after

Prints the modules, their line counts and the longest import chain. Needs only matplotlib and networkx.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def import_graph(root: Path) -> nx.DiGraph:
    files = {module_name(p, root): p for p in sorted((root / "mgn").rglob("*.py"))}
    graph = nx.DiGraph()
    for name, path in files.items():
        graph.add_node(name, lines=len(path.read_text().splitlines()))
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mgn"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("mgn")]
            graph.add_edges_from((name, t) for t in targets if t in files and t != name)
    return graph


# The subpackages in the order their imports point: a module may import its own package, the top level
# (config, cli, devices, distributed, run_paths) and the packages before its own. `mgn.shards` is an entry
# point (the command line of mgn.data.writer): it may import anything, nothing imports it.
LAYERS = ("top", "io", "data", "model", "checkpoint", "eval", "train", "bench", "compare")
ENTRY_POINTS = ("mgn.shards",)


def layer(module: str, root: Path) -> str:
    """The layer of a module: its subpackage, or `top` for mgn's own modules."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (root / "mgn" / parts[1]).is_dir()):
        return parts[1]
    return "top"


def back_edges(graph: nx.DiGraph, root: Path) -> list[tuple[str, str]]:
    """Imports against LAYERS: into a later layer, or of an entry point."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [(a, b) for a, b in graph.edges if a not in ENTRY_POINTS
            and (b in ENTRY_POINTS or rank[layer(b, root)] > rank[layer(a, root)])]


def draw(graph: nx.DiGraph, out: Path, title: str) -> None:
    layers = {n: 0 for n in graph}
    for n in reversed(list(nx.topological_sort(graph))):  # imported-by-nothing on top, leaves at the bottom
        layers[n] = max((layers[m] + 1 for m in graph.successors(n)), default=0)
    rows: dict[int, list[str]] = {}
    for n, layer in layers.items():
        rows.setdefault(layer, []).append(n)
    pos = {n: (i - (len(row) - 1) / 2, layer) for layer, row in rows.items() for i,
           n in enumerate(sorted(row))}
    width = max(len(r) for r in rows.values())
    fig, ax = plt.subplots(figsize=(max(10, 1.9 * width), 1.3 * len(rows) + 1))
    nx.draw_networkx_edges(graph, pos, ax=ax, alpha=0.25, arrows=True, arrowsize=8, node_size=1800)
    for n, (x, y) in pos.items():
        lines = graph.nodes[n]["lines"]
        ax.text(x, y, f"{n.removeprefix('mgn.')}\n{lines}", ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle="round", fc="#fde0dd" if lines > 400 else "#e5f5e0", ec="grey"))
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    out = Path(argv[1]) if len(argv) > 1 else root / "docs" / "modules.png"
    graph = import_graph(root)
    cycles = list(nx.simple_cycles(graph))
    if cycles:
        print(f"import cycles: {cycles[:5]}")
        return 1
    wrong = back_edges(graph, root)
    if wrong:
        print(f"imports against the layers {LAYERS}: {wrong[:10]}")
        return 1
    big = sorted((n for n in graph if graph.nodes[n]["lines"] > 400), key=lambda n: -graph.nodes[n]["lines"])
    chain = nx.dag_longest_path(graph)
    print(f"{len(graph)} modules, {graph.number_of_edges()} imports, no cycles; over 400 lines: "
          f"{[(n, graph.nodes[n]['lines']) for n in big] or 'none'}; longest chain: {' -> '.join(chain)}")
    draw(graph, out, f"mgn: {len(graph)} modules, {graph.number_of_edges()} imports (line counts; red: over "
                     "400)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
