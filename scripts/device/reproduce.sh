#!/usr/bin/env bash
# Reproduce one paper cell with its paper preset on a lent GPU machine (or dry-run the same path on a CPU):
# train, resumable across calls, evaluate on the fixed test episodes, write the record where it comes back.
#
# Usage, from the repository root:
#   bash scripts/device/reproduce.sh BENCHMARK ALGORITHM [extra `metabench run` arguments...]
#   e.g.  bash scripts/device/reproduce.sh omniglot-5w1s maml
#
# Environment (all optional):
#   DATA_DIR       folder holding the dataset folders (default: .data, i.e. .data/omniglot/images_*.zip).
#   WHEELS         folder of carried wheels installed first when present (default: .whl).
#   STATE_DIR      runs, checkpoints, prepared cache and records, kept between calls while the machine stays
#                  warm; outside the carried paths on purpose (default: /var/tmp/metabench).
#   TRAIN_MINUTES  training budget in minutes summed over all calls (Lightning's max_time, which it keeps in
#                  the checkpoint); when it runs out before the preset's steps, the run is evaluated with the
#                  steps it reached, and the record says how many. Default: none (the preset's steps).
#   CALL_SECONDS   this call's limit for the training + evaluation process (default: 500, under the device
#                  tool's 10-minute call limit with room for set-up). Past it the process is stopped, the last
#                  checkpoint stays, and the script exits 75: call it again to resume.
#   MAX_STEPS      override the preset's number of meta-iterations (dry runs).
#   SEED           training seed (default 0).
#   COMMIT         git commit the copied tree came from (recorded when the copy has no .git).
#   OUT            where the record and the training log go (the device tool's $OUT; default $STATE_DIR/out).
#
# Exit status: 0 record written; 75 stopped at CALL_SECONDS, call again to resume; other: an error.
#
# Bringing Omniglot to a lent machine (it has no internet and no ../shared): here, once,
#   mkdir -p .data/omniglot && cp ../shared/data/omniglot/images_*.zip .data/omniglot/
#   grep -qx '/.data/' .git/info/exclude || echo /.data/ >> .git/info/exclude
# then name `.data` in the device call's `carry` (the two zips are 14 MB). Larger datasets: stage.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ $# -lt 2 ]]; then
    echo "usage: bash scripts/device/reproduce.sh BENCHMARK ALGORITHM [metabench run arguments...]" >&2
    exit 2
fi
BENCHMARK=$1 ALGORITHM=$2
shift 2
PY=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-.data}
WHEELS=${WHEELS:-.whl}
STATE_DIR=${STATE_DIR:-/var/tmp/metabench}
CALL_SECONDS=${CALL_SECONDS:-500}
SEED=${SEED:-0}
OUT=${OUT:-$STATE_DIR/out}
mkdir -p "$STATE_DIR" "$OUT"
log() { echo "[reproduce $(date -u +%H:%M:%S)] $*"; }

# 1. Carried wheels (e.g. a package the machine lacks), into a folder of their own on PYTHONPATH.
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    log "installing carried wheels from $WHEELS"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$STATE_DIR/site" "$WHEELS"/*.whl
    export PYTHONPATH="$STATE_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. metabench itself, without its dependencies: the machine has torch, lightning, numpy, pillow, pyyaml, rich
# and tqdm; wandb is missing and only imported for --logger wandb.
if ! "$PY" -c "import metabench.cli" 2>/dev/null; then
    log "installing metabench (no dependencies, no index)"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$STATE_DIR/pip.log" 2>&1 || {
        cat "$STATE_DIR/pip.log" >&2
        echo "reproduce: could not install metabench from $(pwd) (see above)" >&2
        exit 1
    }
fi
"$PY" - <<'EOF'
import torch
print(f"[reproduce] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
EOF

# 3. Data: fail early and clearly when the carried folder is missing.
if [[ ! -d "$DATA_DIR" ]]; then
    echo "reproduce: data folder $DATA_DIR not found; carry it (see the header of this script) or set DATA_DIR" >&2
    exit 2
fi

# 4. Train (resuming whatever checkpoint a previous call left), test, write the record.
args=(run --benchmark "$BENCHMARK" --algorithm "$ALGORITHM" --resume --quiet --seed "$SEED"
      --data-root "$DATA_DIR" --cache-dir "$STATE_DIR/cache" --out-dir "$STATE_DIR/runs"
      --records-dir "$STATE_DIR/records" --logger csv)
[[ -n ${MAX_STEPS:-} ]] && args+=(--max-steps "$MAX_STEPS")
[[ -n ${TRAIN_MINUTES:-} ]] && args+=(--set "trainer.max_time_minutes=$TRAIN_MINUTES")
[[ -n ${COMMIT:-} ]] && export METABENCH_GIT_COMMIT=$COMMIT
before=$(ls "$STATE_DIR/records" 2>/dev/null | sort || true)
log "metabench ${args[*]} $*"
status=0
PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=60 "$CALL_SECONDS" \
    "$PY" -m metabench.cli "${args[@]}" "$@" || status=$?
run_dir=$(ls -d "$STATE_DIR/runs/$BENCHMARK/$ALGORITHM"-*-seed"$SEED" 2>/dev/null | head -n 1 || true)
if [[ -n $run_dir ]]; then  # the training log comes back either way (step, loss, validation curve)
    log_csv=$(find "$run_dir" -name metrics.csv -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -n 1 | cut -d' ' -f2-)
    [[ -n $log_csv ]] && cp "$log_csv" "$OUT/metrics.csv"
fi
if [[ $status -eq 124 || $status -eq 137 || $status -eq 130 ]]; then
    ckpt="$run_dir/checkpoints/last.ckpt"
    log "stopped at the ${CALL_SECONDS}s call limit; checkpoint: $( [[ -f $ckpt ]] && echo "$ckpt" || echo none yet )"
    log "call this script again (same STATE_DIR, machine still warm) to resume"
    exit 75
elif [[ $status -ne 0 ]]; then
    echo "reproduce: metabench run failed with status $status" >&2
    exit "$status"
fi

# 5. The new record goes to $OUT/records, where the device tool brings it back.
after=$(ls "$STATE_DIR/records" | sort)
new=$(comm -13 <(echo "$before") <(echo "$after"))
if [[ -z $new ]]; then
    echo "reproduce: the run finished but wrote no new record in $STATE_DIR/records" >&2
    exit 1
fi
mkdir -p "$OUT/records"
for name in $new; do cp "$STATE_DIR/records/$name" "$OUT/records/"; log "record: $OUT/records/$name"; done
