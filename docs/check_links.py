"""Check local markdown links and #anchors (GitHub's heading slugs) in the given files, or in the project's
docs.

    python docs/check_links.py                     # README.md, docs/*.md, benchmarks/results/README.md, ...
    python docs/check_links.py README.md docs/training.md
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ("README.md", "docs/*.md", "benchmarks/results/README.md", "shards/README.md", "slurm/README.md",
           "mgn/DESIGN.md")


def slugs(path: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (repeated headings get -1, -2, ...)."""
    out, seen, fence = set(), {}, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fence = not fence
            heading = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
            if not heading:
                continue
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    broken = []
    for match in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        ok = os.path.exists(resolved) and (not anchor
                                           or (resolved.endswith(".md") and anchor in slugs(resolved)))
        if not ok:
            broken.append(f"{path} -> {target}")
    return broken


def main(paths: list[str]) -> int:
    if not paths:
        paths = sorted({p for pattern in DEFAULT for p in glob.glob(os.path.join(ROOT, pattern))})
    broken = [line for path in paths for line in broken_links(path)]
    for line in broken:
        print("BAD", line)
    print(f"{len(paths)} files, {len(broken)} broken links")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
