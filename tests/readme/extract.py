"""Print the README's first-run code block NAME: the fenced block right after the marker
line `<!-- first-run: NAME -->`. Exit 1 when there is none, so a README edit that drops a
step fails the test instead of skipping it."""
import sys

readme, name = sys.argv[1], sys.argv[2]
lines = open(readme, encoding="utf-8").read().split("\n")
marker = f"<!-- first-run: {name} -->"
for i, line in enumerate(lines):
    if line.strip() != marker:
        continue
    j = i + 1
    while j < len(lines) and not lines[j].startswith("```"):
        j += 1
    end = j + 1
    while end < len(lines) and not lines[end].startswith("```"):
        end += 1
    if j >= len(lines) or end >= len(lines):
        break
    print("\n".join(lines[j + 1 : end]))
    sys.exit(0)
print(f"README has no first-run block {name!r}", file=sys.stderr)
sys.exit(1)
