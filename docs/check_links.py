"""Check local markdown links and #anchors (GitHub slug rules) in the given files.

    python docs/check_links.py README.md docs/*.md benchmarks/results/README.md
"""
import re, os, sys
def slugs(path):
    out, seen, fence = set(), {}, False
    for line in open(path, encoding='utf-8'):
        if line.startswith('```'): fence = not fence
        if fence: continue
        m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
        if not m: continue
        t = re.sub(r'`', '', m.group(1)).lower()
        t = re.sub(r'[^\w\- ]', '', t).replace(' ', '-')
        k = seen.get(t, 0); seen[t] = k + 1
        out.add(t if k == 0 else f'{t}-{k}')
    return out
bad = 0
for f in sys.argv[1:]:
    text = open(f, encoding='utf-8').read()
    text = re.sub(r'```.*?```', '', text, flags=re.S)
    for m in re.finditer(r'!?\[[^\]]*\]\(([^)\s]+)\)', text):
        t = m.group(1)
        if re.match(r'[a-z]+:', t): continue
        p, _, a = t.partition('#')
        target = os.path.normpath(os.path.join(os.path.dirname(f), p)) if p else f
        ok = os.path.exists(target)
        if ok and a:
            ok = target.endswith('.md') and a in slugs(target)
        print(('ok  ' if ok else 'BAD ') + f + ' -> ' + t); bad += not ok
print('bad:', bad); sys.exit(bad > 0)
