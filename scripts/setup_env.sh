#!/usr/bin/env bash
# Builds .venv/ at the repository root. Idempotent: a stamp of the inputs makes a second call a no-op.
# Override versions for a CUDA machine with e.g. TORCH_SPEC="torch==2.5.1" TORCHVISION_SPEC="torchvision==0.20.1"
# (and PIP_EXTRA_INDEX_URL for a CUDA wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.29.1}
L2L_VERSION=0.2.0

stamp_inputs() { cat pyproject.toml scripts/setup_env.sh; echo "$TORCH_SPEC $TORCHVISION_SPEC $L2L_VERSION"; }
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$want" ] \
   && "$VENV/bin/python" -c "import maml_runner, learn2learn" 2>/dev/null; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check"
$PIP install -q "$TORCH_SPEC" "$TORCHVISION_SPEC"
$PIP install -q "cython>=3" "numpy" "scipy" "tqdm" "requests" "gym" "setuptools" "wheel"

# learn2learn 0.2.0 ships only an sdist whose pre-generated C does not compile on Python >= 3.11
# (longintrepr.h): regenerate it with Cython 3 and build against the venv's own torch/numpy.
if ! "$VENV/bin/python" -c "import learn2learn" 2>/dev/null; then
  build=$(mktemp -d)
  $PIP download -q --no-deps --no-binary :all: "learn2learn==$L2L_VERSION" -d "$build"
  tar -xzf "$build/learn2learn-$L2L_VERSION.tar.gz" -C "$build"
  src="$build/learn2learn-$L2L_VERSION"
  # gsutil and qpth serve dataset downloads and MetaOptNet only; they pull in a large cloud SDK.
  sed -i "/'gsutil',/d; /'qpth>=0.0.15',/d" "$src/setup.py"
  (cd "$src" && "$root/$VENV/bin/cython" -3 learn2learn/data/*.pyx >/dev/null)
  $PIP install -q --no-build-isolation --no-deps "$src"
  rm -rf "$build"
fi

$PIP install -q -e ".[dev,sweeps,optuna]"
"$VENV/bin/python" -c "import maml_runner, learn2learn, torch, hydra, optuna; from learn2learn.data import MetaDataset, TaskDataset"
echo "$want" > "$VENV/.setup-stamp"
echo "setup: .venv ready (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
