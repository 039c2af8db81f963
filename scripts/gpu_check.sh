#!/usr/bin/env bash
# GPU check for the speed work (issue 6): parity tests on CUDA, then `metabench bench speed` on CUDA.
# Run from the repository root on the lent GPU machine (Python 3.12 with torch, lightning, numpy; no wandb, no
# internet). Writes under $OUT when set (the device tool brings it back), else results/speed/. Budget: < 5 min.
#
# Missing packages travel as wheels in .whl/ (git-excluded; see the device README "Notes"), e.g. here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# learn2learn 0.2.0 has no cp312 wheel (it is built from source: scripts/install_learn2learn.sh); without
# it the learn2learn rows are simply absent from the table.
set -uo pipefail
OUT_DIR=${OUT:-results/speed}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
# wandb is a declared dependency but imported lazily: --no-deps keeps pip from looking for it
$PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
$PY -c "import learn2learn" 2>/dev/null && echo "learn2learn: present" || echo "learn2learn: absent (no l2l rows)"

status=0
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_engines.py tests/test_inner_loop.py 2>&1 \
    | tee "$OUT_DIR/parity-cuda.log" || status=1
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_mamlpp.py -k cuda 2>&1 \
    | tee -a "$OUT_DIR/parity-cuda.log" || status=1
timeout 240 $PY -m metabench.cli bench speed --accelerator gpu --algorithm maml --iterations 10 --warmup 3 \
    --no-isolate --out "$OUT_DIR/speed-cuda.json" 2>&1 | tee "$OUT_DIR/speed-cuda.log" || status=1
exit $status
