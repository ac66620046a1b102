"""The layout keeps its promises (issue 34): subpackages whose imports point one way, few modules at the top,
one owner of the run folder's names, a Trainer that reads as the loop it is, a README that fits a screen and
an index of every guide."""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

from module_graph import LAYERS, back_edges, import_graph, layer  # noqa: E402


def test_imports_between_subpackages_point_one_way_and_the_check_sees_a_back_edge():
    graph = import_graph(ROOT)
    assert back_edges(graph, ROOT) == []
    assert {layer(n, ROOT) for n in graph} <= set(LAYERS)
    graph.add_edge("mgn.data.loader", "mgn.train.loop")  # a loader that imported the training loop
    assert back_edges(graph, ROOT) == [("mgn.data.loader", "mgn.train.loop")]


def test_mgn_holds_at_most_ten_modules_at_its_top_and_each_subpackage_says_its_job():
    top = sorted(p.name for p in (ROOT / "mgn").glob("*.py"))
    assert len(top) <= 10, top
    for package in (p for p in (ROOT / "mgn").iterdir() if (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and ("May import" in doc or package.name == "compare"), package


def test_the_run_folders_names_are_spelled_in_one_module():
    spelled = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mgn").rglob("*.py")
               if re.search(r'/\s*"(checkpoints|student|student_best|metrics\.csv|start\.json|'
                            r'train\.log|tb)"',
                            p.read_text())}
    assert spelled == {"mgn/run_paths.py"}


def test_the_trainer_is_at_most_two_hundred_lines():
    tree = ast.parse((ROOT / "mgn" / "train" / "loop.py").read_text())
    [trainer] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno + 1 <= 200


def test_the_readme_fits_on_a_screen_and_the_docs_index_lists_every_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    index = (ROOT / "docs" / "README.md").read_text()
    listed = {(ROOT / "docs" / link).resolve() for link in re.findall(r"\]\(([^)#]+)", index)}
    guides = [p for p in ROOT.rglob("*.md") if not {".git", "runs", "node_modules"} & set(p.parts)
              and p.resolve() not in {(ROOT / "README.md").resolve(), (ROOT / "docs" / "README.md").resolve()}
              and not p.is_relative_to(ROOT / "benchmarks" / "results")
              or p == ROOT / "benchmarks" / "results" / "README.md"]
    missing = sorted(p.relative_to(ROOT).as_posix() for p in guides if p.resolve() not in listed)
    assert missing == [], f"docs/README.md does not list {missing}"
