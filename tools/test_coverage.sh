#!/usr/bin/env bash
# Line coverage of scalecert/ by what `make test` runs: pytest on the package and the tiny-profile notebooks that nbval
# checks, each measured in every process it starts (xdist workers, papermill runs, notebook kernels). Writes
# build/coverage/PART.json (the executed statements) for PART = pytest and nbval.
# Then: python tools/coverage_diff.py report build/coverage (percentages), or diff OLD_DIR NEW_DIR (what a change lost)
# Usage: bash tools/test_coverage.sh [pytest|nbval|all]   (from the project root, after make setup data)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
PY=$PWD/.venv/bin/python
out=build/coverage
hook=$out/hook
mkdir -p "$hook"
cat > "$out/coveragerc" <<EOF
[run]
source = scalecert
parallel = True
data_file = $PWD/$out/data/.coverage
EOF
# every Python process started with this PYTHONPATH measures itself when COVERAGE_PROCESS_START names the rc file
echo "import coverage; coverage.process_startup()" > "$hook/sitecustomize.py"
export COVERAGE_PROCESS_START=$PWD/$out/coveragerc PYTHONPATH=$PWD/$hook
jobs=$(env -u OMP_NUM_THREADS nproc)

summarise() {  # combine the measurement of one part into build/coverage/PART.json
  (cd "$out/data" && $PY -m coverage combine --quiet --rcfile="$COVERAGE_PROCESS_START" .)
  $PY tools/coverage_diff.py summarise "$out/data/.coverage" "$out/$1.json"
}

run_part() {
  local part=$1
  rm -rf "$out/data" && mkdir -p "$out/data"
  if [ "$part" = pytest ]; then
    SCALECERT_TEST_THREADS=1 OMP_NUM_THREADS=1 $PY -m pytest -q -p no:cacheprovider -n "$jobs" --dist loadfile tests
  else
    # the notebooks run as `make golden` runs them (papermill, tiny profile): the cells nbval executes. nbval
    # itself kills its kernels, which then never write their measurement; papermill shuts them down cleanly
    rm -rf build/cov-cache build/cov-figures build/cov-notebooks && mkdir -p build/cov-notebooks
    ls notebooks/[0-9]*.ipynb | OMP_NUM_THREADS=1 SCALECERT_FIG_DIR=$PWD/build/cov-figures \
      SCALECERT_CACHE_DIR=$PWD/build/cov-cache xargs -P "$jobs" -I{} sh -c \
      '$0 -m papermill --engine scalecert --log-level WARNING -k python3 "$1" build/cov-notebooks/$(basename "$1") \
       -p profile tiny || exit 255' "$PY" {}
  fi
  summarise "$part"
}

case $what in
  pytest | nbval) run_part "$what" ;;
  all) run_part pytest; run_part nbval; $PY tools/coverage_diff.py report "$out" ;;
  *) echo "error: expected pytest, nbval or all, got $what" >&2; exit 2 ;;
esac
