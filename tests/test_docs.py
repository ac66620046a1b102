"""The documentation's links lead somewhere: every local link and #anchor in the project's markdown
resolves."""
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
    done = subprocess.run([sys.executable, "docs/check_links.py", str(page)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 1 and "2 broken links" in done.stdout and "#nowhere" in done.stdout, done.stdout


def test_the_demo_figures_are_exact_on_their_own_machine_and_close_elsewhere(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "docs"))
    import demo_figures

    rows = [{"step": "512", "role": "student", "accuracy": "0.85"}, {"step": "512", "role": "teacher",
                                                                       "accuracy": "0.917"}]
    monkeypatch.setattr(demo_figures, "published", lambda path: {"student": 0.85, "teacher": 0.917})
    for made_on, here, off, expected in (("AuthenticAMD", "AuthenticAMD AVX2", 0.0, 0),
                                         ("AuthenticAMD", "AuthenticAMD AVX2", 0.001, 1),  # exact there
                                         ("AuthenticAMD", "GenuineIntel AVX512", 0.008, 0),  # close elsewhere
                                         ("AuthenticAMD", "GenuineIntel AVX512", 0.05, 1)):
        monkeypatch.setattr(demo_figures, "published_machine", lambda path: made_on)
        monkeypatch.setattr(demo_figures, "this_machine", lambda: here)
        ran = [dict(r, accuracy=str(float(r["accuracy"]) + off)) for r in rows]
        assert demo_figures.check(ran) == expected, (made_on, here, off)
    assert "not exactly" in capsys.readouterr().out
