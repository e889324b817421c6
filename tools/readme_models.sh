#!/usr/bin/env bash
# Refresh the shipped-models table of docs/models.md from the checkpoint cards (python -m scalecert models), written
# between its <!-- models-table --> markers with the cells' padding removed. `make readme` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
table=$(.venv/bin/python -m scalecert models)
python3 - "$table" docs/models.md <<'PY'
import re, sys

def compact(line):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    cells = [re.sub(r"-{3,}", "---", c) if re.fullmatch(r":?-+:?", c) else c for c in cells]
    return "| " + " | ".join(cells) + " |"

table = "\n".join(compact(l) for l in sys.argv[1].splitlines() if l.strip())
path = sys.argv[2]
s = open(path).read()
if not re.search(r"<!-- models-table -->\n.*?<!-- /models-table -->", s, flags=re.S):
    sys.exit(f"{path}: no <!-- models-table --> ... <!-- /models-table --> block")
s = re.sub(r"(<!-- models-table -->\n).*?(<!-- /models-table -->)", lambda m: m.group(1) + table + "\n" + m.group(2), s, flags=re.S)
open(path, "w").write(s)
PY
