"""The documentation's links lead somewhere: every local link and #anchor in the project's markdown resolves."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_local_link_and_anchor_in_the_docs_resolves(tmp_path):
    done = subprocess.run([sys.executable, "docs/check_links.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and " 0 broken links" in done.stdout, done.stdout
    # and the checker does see a broken one
    page = tmp_path / "page.md"
    page.write_text("# Title\n[here](#title) [gone](#nowhere) [file](missing.md)\n")
    done = subprocess.run([sys.executable, "docs/check_links.py", str(page)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "2 broken links" in done.stdout and "#nowhere" in done.stdout, done.stdout
