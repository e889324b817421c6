#!/usr/bin/env bash
# Refresh the shipped-models table of README.md from the checkpoint cards (python -m scalecert models).
set -euo pipefail
cd "$(dirname "$0")/.."
table=$(.venv/bin/python -m scalecert models)
python3 - "$table" <<'PY'
import re, sys
s = open("README.md").read()
s = re.sub(r"(<!-- models-table -->\n).*?(<!-- /models-table -->)", lambda m: m.group(1) + sys.argv[1] + "\n" + m.group(2), s, flags=re.S)
open("README.md", "w").write(s)
PY
