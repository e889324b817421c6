#!/usr/bin/env bash
# Run the paper profile in the background, one notebook at a time, most important tables first.
# Results go to the committed cache (data/cache/, resumable chunk by chunk); figures and executed
# notebooks go to build/paper/JOB/ (JOB defaults to DATASET) so that a partial run never overwrites the committed quick figures.
# With DATASET set, each finished notebook's tables and plots are copied to figures/paper/DATASET/ (committed, with
# its REPORT.md). When every notebook has run once, `make figures PROFILE=paper` re-renders figures/ from the cache.
# Usage: nohup bash tools/paper_profile.sh [NOTEBOOK ...] >> data/runs/logs/paper.log 2>&1 &
#        (DATASET=imagenette or DATASET=cifar10: that data set only; default both; JOB=NAME: output folder
#        build/paper/NAME, for a second job on one data set; COMPUTE=1: notebooks whose paper profile reads the cache
#        only, 05 and 12, compute what it lacks; 0 or unset: their default)
# Hours to days on a 2-core CPU; never run in CI.
# The body is one function, read whole before it runs, so that editing this file never changes a running job.
set -euo pipefail
main() {
  cd "$(dirname "$0")/.."
  # With the kernel's autogroup scheduling, nice only ranks processes within one autogroup, and the
  # notebook kernel (which does the work) gets an autogroup of its own (Jupyter starts it with setsid):
  # lower that autogroup's weight, so that training jobs elsewhere keep the cores.
  lower() { for k in $(pgrep -P "$1"); do { echo "${NICE:-19}" > "/proc/$k/autogroup"; } 2>/dev/null || true; done; }
  local PY=.venv/bin/python
  # one folder per job (JOB, default DATASET), so that jobs can run side by side; two jobs on one data set share the
  # work of every cached run, chunk by chunk
  local out=build/paper/${JOB:-${DATASET:-all}}
  export OMP_NUM_THREADS=${THREADS:-1} SCALECERT_FIG_DIR=$PWD/$out/figures
  local order=(05_certification 06_topk_rate 08_layer_selection 02_sin_localization 03_prediction_stability
         04_adaptive_attack 09_empirical_recovery 10_soundness_audit 11_window_family 07_window_merging 12_does_sin_help 01_models 00_data)
  [[ $# -gt 0 ]] && order=("$@")
  mkdir -p "$out/executed" "$SCALECERT_FIG_DIR"
  local nb start pm rc
  for nb in "${order[@]}"; do
    [[ -f notebooks/$nb.ipynb ]] || { echo "no notebook notebooks/$nb.ipynb" >&2; exit 2; }
    echo "$(date -u +%FT%TZ) start $nb"
    start=$(date +%s)
    $PY -m papermill --engine scalecert --log-level WARNING -k python3 "notebooks/$nb.ipynb" "$out/executed/$nb.ipynb" \
      -p profile paper ${DATASET:+-p datasets "$DATASET"} ${COMPUTE:+-p compute "$COMPUTE"} &
    pm=$!
    while kill -0 "$pm" 2>/dev/null; do lower "$pm"; sleep 10; done
    wait "$pm" || { rc=$?; echo "$(date -u +%FT%TZ) FAILED $nb (exit $rc); the notebooks after it did not run" >&2; exit $rc; }
    echo "$(date -u +%FT%TZ) done $nb in $(( $(date +%s) - start )) s"
    # a finished notebook's tables and plots (every file named after its number, NN_*) of one data set go to the committed figures/paper/DATASET/ (build/ is
    # not committed), with that folder's report; commit them with the cache
    if [[ -n ${DATASET:-} ]] && compgen -G "$SCALECERT_FIG_DIR/${nb%%_*}_*" >/dev/null; then
      mkdir -p "figures/paper/$DATASET"
      cp "$SCALECERT_FIG_DIR/${nb%%_*}_"* "figures/paper/$DATASET/"
      $PY -m scalecert.report --profile paper --fig-dir "figures/paper/$DATASET" > "figures/paper/$DATASET/.REPORT.md.$$.tmp" \
        && mv "figures/paper/$DATASET/.REPORT.md.$$.tmp" "figures/paper/$DATASET/REPORT.md"
    fi
  done
}
main "$@"; exit
