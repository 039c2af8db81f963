#!/usr/bin/env bash
# Install learn2learn 0.2.0 (the last release) into a Python environment, as an OPTIONAL baseline and
# correctness oracle for metabench's tests (tests/test_learn2learn_parity.py). metabench never imports it.
#
# Usage: scripts/install_learn2learn.sh [PIP]
#   PIP     the pip executable of the target environment (e.g. /work/venv/bin/pip); its interpreter is read
#           from its shebang (or a `python` beside it). Default: `python -m pip` of the current environment.
#   PYTHON  (env var) overrides the interpreter used for the checks and for cythonizing.
#
# Why this script: the 0.2.0 sdist ships Cython 0.29-generated .c files that do not compile against
# Python 3.11's C API. We regenerate them from the shipped .pyx sources with Cython 3 and build from that.
#
# Steps:
#   1. skip everything if `import learn2learn` already gives 0.2.0 (idempotent);
#   2. put cython>=3 (and setuptools) in a throw-away folder on PYTHONPATH: build-time only, the target
#      environment is not touched by them;
#   3. `pip download --no-deps --no-binary learn2learn` the sdist. Only learn2learn is forced to source:
#      `--no-binary :all:` would also build setuptools and, through learn2learn's `setup_requires`, Cython
#      itself from source in pip's isolated build env, which took ~9.5 min on a 2-core machine;
#      `--no-build-isolation` lets pip's metadata step use the Cython from step 2 instead (~3 s);
#   4. unpack, delete the shipped generated .c files and the shipped `.eggs/` folder (stale Cython 0.29
#      eggs from the authors' machines), cythonize the three .pyx files with the compiler directives that
#      learn2learn's own setup.py uses for its Cython path (language_level=3, embedsignature=True);
#   5. `pip install --no-deps --no-build-isolation` the tree (setup.py then compiles our fresh .c files);
#   6. install only the runtime deps that `import learn2learn` really needs. Of its install_requires
#      (numpy, gym, torch, torchvision, scipy, requests, gsutil, tqdm, qpth):
#        - gym==0.26.2: imported at module level by learn2learn/gym/envs/__init__.py (pure Python; it
#          prints an "unmaintained" notice on stderr at import, harmless);
#        - scipy: imported at module level by learn2learn/vision/models/cnn4.py and
#          vision/datasets/{vgg_flowers,fgvc_fungi}.py (a binary wheel, numpy-only dependency);
#        - requests, tqdm: module level in learn2learn/data/utils.py (usually present already);
#        - NOT installed: qpth, pandas, pytorch_lightning (each imported inside `try/except ImportError`
#          with a stand-in that raises only when used; metabench's env has pytorch_lightning anyway),
#          gsutil (a CLI, never imported);
#        - torch, torchvision, numpy: must already be there; this step's pip call gets a constraints file
#          pinning the installed versions, so pip can never up/downgrade them (the other pip calls use
#          --no-deps or --target and cannot touch them either).
#   7. check `import learn2learn`, MAML, MetaDataset, TaskDataset and the task transforms.
#
# Patches to learn2learn's sources: none are needed with torch 2.14 / numpy 2.4 / Cython 3.3 (checked:
# MAML clone/adapt, MetaDataset, TaskDataset with NWays/KShots/LoadData/RemapLabels/ConsecutiveLabels).
#
# Needs: a C compiler and Python headers (gcc, python3.11 dev headers), network access to PyPI only.
# Took 2 min 14 s on a 2-core machine with an empty pip cache (C compile of the three extensions ~45 s,
# the rest is downloads); an already-installed environment returns in ~7 s (the import check).
# pip reports "learn2learn 0.2.0 requires gsutil / qpth, which is not installed" (and `pip check` will
# too): expected, those two are deliberately left out (see step 6).
set -euo pipefail

L2L_VERSION=0.2.0

# --- resolve the pip and the interpreter of the target environment -----------------------------------
if [[ $# -ge 1 ]]; then
    PIP=("$1")
    if [[ -z "${PYTHON:-}" ]]; then
        pip_path=$(command -v "$1") || { echo "install_learn2learn: no such pip: $1" >&2; exit 2; }
        if [[ -x "$(dirname "$pip_path")/python" ]]; then
            PYTHON="$(dirname "$pip_path")/python"
        else
            # pip's console script starts with '#!/path/to/python'
            PYTHON=$(head -n 1 "$pip_path" | sed -e 's/^#![[:space:]]*//' -e 's/[[:space:]].*$//')
        fi
    fi
else
    PYTHON=${PYTHON:-$(command -v python || command -v python3)}
    PIP=("$PYTHON" -m pip)
fi
echo "install_learn2learn: python=$PYTHON pip=${PIP[*]}"

# --- 1. idempotence --------------------------------------------------------------------------------------
if "$PYTHON" -c "import sys, learn2learn; sys.exit(learn2learn.__version__ != '$L2L_VERSION')" 2>/dev/null; then
    echo "install_learn2learn: learn2learn $L2L_VERSION already importable, nothing to do"
    exit 0
fi

"$PYTHON" -c "import torch" 2>/dev/null || {
    echo "install_learn2learn: torch is not importable by $PYTHON; install the project first" >&2
    exit 1
}

start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/install-l2l.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Pin what is installed so that step 6's pip call cannot touch it (scipy/gym are resolved against these
# exact versions).
"$PYTHON" - >"$work/constraints.txt" <<'EOF'
from importlib import metadata
for name in ("torch", "torchvision", "numpy", "pillow"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
echo "install_learn2learn: pinned: $(tr '\n' ' ' <"$work/constraints.txt")"

# --- 2. build tools in a side folder (build-time only) ---------------------------------------------------
"${PIP[@]}" install --quiet --disable-pip-version-check --target "$work/buildtools" "cython>=3" "setuptools>=70.1"
# Steps 3-5 run with them first on the path (setup.py's `setup_requires=['cython']` is then satisfied too).
with_buildtools=(env "PYTHONPATH=$work/buildtools${PYTHONPATH:+:$PYTHONPATH}")

# --- 3. the sdist ----------------------------------------------------------------------------------------
"${with_buildtools[@]}" "${PIP[@]}" download --quiet --disable-pip-version-check --no-deps --no-binary learn2learn \
    --no-build-isolation -d "$work/dist" "learn2learn==$L2L_VERSION"
tar -xzf "$work/dist/learn2learn-$L2L_VERSION.tar.gz" -C "$work"
tree="$work/learn2learn-$L2L_VERSION"

# --- 4. regenerate the C sources with Cython 3 ----------------------------------------------------------
rm -f "$tree"/learn2learn/data/*.c
rm -rf "$tree/.eggs"
(
    cd "$tree"
    "${with_buildtools[@]}" "$PYTHON" - <<'EOF'
from Cython.Build import cythonize

# Same directives as learn2learn's setup.py uses when it cythonizes itself (its `develop` path).
cythonize(
    ["learn2learn/data/meta_dataset.pyx", "learn2learn/data/task_dataset.pyx", "learn2learn/data/transforms.pyx"],
    compiler_directives={"language_level": 3, "embedsignature": True},
    quiet=True,
)
EOF
)
for ext in meta_dataset task_dataset transforms; do
    [[ -s "$tree/learn2learn/data/$ext.c" ]] || { echo "install_learn2learn: cythonize produced no $ext.c" >&2; exit 1; }
done

# --- 5. build and install learn2learn itself (no dependencies) -------------------------------------------
"${with_buildtools[@]}" "${PIP[@]}" install --quiet --disable-pip-version-check --no-cache-dir --no-deps --no-build-isolation "$tree"

# --- 6. the runtime deps that `import learn2learn` needs (see the header) ---------------------------------
"${PIP[@]}" install --quiet --disable-pip-version-check -c "$work/constraints.txt" \
    "gym==0.26.2" scipy requests tqdm

# --- 7. check ----------------------------------------------------------------------------------------------
# (output kept aside: gym prints its "unmaintained" notice on every import)
"$PYTHON" - >"$work/check.log" 2>&1 <<EOF || { cat "$work/check.log" >&2; exit 1; }
import learn2learn
from learn2learn.algorithms import MAML
from learn2learn.data import MetaDataset, TaskDataset
from learn2learn.data.transforms import NWays, KShots, LoadData, RemapLabels

assert learn2learn.__version__ == "$L2L_VERSION", learn2learn.__version__
EOF
echo "install_learn2learn: learn2learn $L2L_VERSION installed, imports fine ($(( $(date +%s) - start )) s)"
