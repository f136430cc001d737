#!/usr/bin/env bash
# One short GPU check (<= 8 minutes on one GPU, whole script): the CUDA tests; side-by-side checks of the whole step
# (scripts/bench_formulations.py: float32 vs TF32, a CUDA-graph replay, grouped_conv's and norm_derivatives'
# derivatives vs torch's); scripts/bench_speed.py --device cuda (reference and peer columns, Omniglot-shaped generated
# data); a timed 2,000-iteration 5w1s `maml-run` on CUDA; and, if time is left, bf16 autocast vs float32 and
# torch.compile of first-order steps.
# Writes a markdown summary (default $OUT/gpu_check.md, else outputs/gpu_check/gpu_check.md) as it goes, so a run cut
# short still says what it did. Each stage has its own time limit and never runs past the overall deadline.
#
#   bash scripts/gpu_check.sh                        # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run              # what would run (environment check only; any machine)
#   bash scripts/gpu_check.sh --summary PATH --budget 480
#   bash scripts/gpu_check.sh --stages cuda_tests,fixture,tf32   # only these stages (comma-separated names below)
#
# The GPU image lacks hydra, omegaconf, gym and learn2learn and has no package index: run scripts/gpu_wheels.sh here
# first and carry .whl with the call (device tool: carry [".whl"]); the check installs them in a temporary folder.
#
# Python: .venv/bin/python when it has torch, hydra, omegaconf and learn2learn; else python3 with .whl/ installed;
# else `make setup` is tried (it needs a package index: fails fast offline); else the first python3 on PATH with those
# modules, run with PYTHONPATH=repo.
# Data: the shared Omniglot is not on a GPU machine, so a generated fixture in the original layout (1,623 characters
# x 20 drawings, tests/omniglot_fixture.py's bar patterns) stands in: timings are representative, accuracies are not.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

BUDGET=450
STAGES=""  # empty: every stage
DRY_RUN=0
OUT_DIR=${OUT:-$REPO/outputs/gpu_check}
SUMMARY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET=$2; shift ;;
    --summary) SUMMARY=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --stages) STAGES=",$2,"; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1' (allowed: --dry-run, --budget SECONDS, --summary PATH, --out DIR," \
            "--stages A,B)" >&2
       exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
SUMMARY=${SUMMARY:-$OUT_DIR/gpu_check.md}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$(date +%s)
DEADLINE=$((START + BUDGET))

say() { echo "$*" | tee -a "$SUMMARY"; }
remaining() { echo $((DEADLINE - $(date +%s))); }

# run_stage NAME LIMIT_SECONDS COMMAND...: runs under `timeout` (the smaller of LIMIT and what is left, less a
# reserve for the summary); its output goes to $OUT_DIR/<NAME>.log; one summary line with status and seconds.
run_stage() {
  local name=$1 limit=$2; shift 2
  if [ -n "$STAGES" ] && [[ "$STAGES" != *",$name,"* ]]; then
    return 125
  fi
  local left=$(( $(remaining) - 15 ))
  if [ "$left" -lt 20 ]; then
    say "- **$name**: SKIPPED (out of time: $(remaining) s left of $BUDGET)"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY_RUN" = 1 ]; then
    say "- **$name** (limit ${limit} s): \`$*\`"
    return 0
  fi
  local began=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - began ))
  case $rc in
    0) say "- **$name**: ok (${took} s)" ;;
    124|137) say "- **$name**: TIMED OUT after ${took} s (limit ${limit} s); partial output in $name.log" ;;
    *) say "- **$name**: FAILED (exit $rc, ${took} s); see $name.log" ;;
  esac
  return $rc
}

: > "$SUMMARY"
say "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
say ""
say "Command: \`bash scripts/gpu_check.sh$([ "$DRY_RUN" = 1 ] && echo ' --dry-run')\` (budget ${BUDGET} s); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
say ""

# ---- the card ----------------------------------------------------------------------------------------------------
CARD="none"
if command -v nvidia-smi > /dev/null 2>&1; then
  CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
  CARD=${CARD:-"nvidia-smi present, no GPU listed"}
fi
say "- GPU (nvidia-smi): $CARD"

# ---- a python with what the runner needs --------------------------------------------------------------------------
NEEDED="torch, hydra, omegaconf, learn2learn, torchvision"
has_modules() { "$1" -c "import torch, hydra, omegaconf, learn2learn, torchvision" > /dev/null 2>&1; }
PY=""
# The lent GPU machine's image has torch but not hydra, omegaconf, gym or learn2learn, and no package index:
# scripts/gpu_wheels.sh (run where pip works) prepares .whl/, carried with the call and installed in a temp folder.
if [ "$DRY_RUN" = 0 ] && [ -d .whl/l2l ] && ! { [ -x .venv/bin/python ] && has_modules .venv/bin/python; } \
   && command -v python3 > /dev/null 2>&1 && ! has_modules "$(command -v python3)"; then
  began=$(date +%s)
  if python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl \
       > "$OUT_DIR/wheels.log" 2>&1 \
     && (cd .whl/l2l && python3 setup.py build_ext --inplace -j 4) >> "$OUT_DIR/wheels.log" 2>&1; then
    export PYTHONPATH="$WORK/site:$REPO/.whl/l2l${PYTHONPATH:+:$PYTHONPATH}"
    WHEELS=" and the .whl/ modules"
    say "- hydra, omegaconf, gym and learn2learn from .whl/ (scripts/gpu_wheels.sh): installed in $(( $(date +%s) - began )) s"
  else
    say "- installing .whl/ (scripts/gpu_wheels.sh) FAILED; see wheels.log"
  fi
fi
if [ -x .venv/bin/python ] && has_modules .venv/bin/python; then
  PY=$REPO/.venv/bin/python
  ENV_NOTE=".venv"
elif [ "$DRY_RUN" = 0 ] && [ "$(remaining)" -gt 200 ] && ! has_modules "$(command -v python3 || echo false)" \
     && PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=5 timeout 120 bash scripts/setup_env.sh > "$OUT_DIR/setup_env.log" 2>&1 \
     && has_modules .venv/bin/python; then
  PY=$REPO/.venv/bin/python
  ENV_NOTE=".venv built by make setup"
else
  for candidate in python3 python; do
    if command -v "$candidate" > /dev/null 2>&1 && has_modules "$(command -v "$candidate")"; then
      PY=$(command -v "$candidate")
      ENV_NOTE="$candidate on PATH with PYTHONPATH=repo${WHEELS:-} (no usable .venv)"
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  say "- Python: NONE has $NEEDED (.venv missing or incomplete, make setup failed offline: see setup_env.log)."
  for candidate in python3 python; do
    command -v "$candidate" > /dev/null 2>&1 || continue
    say "  - $candidate: $("$candidate" -c 'import importlib.util as u; print(", ".join(m + (" ok" if u.find_spec(m) else " MISSING") for m in ("torch", "hydra", "omegaconf", "learn2learn", "torchvision")))' 2>&1 | tail -1)"
  done
  say ""
  say "Nothing measured: no environment that can import the runner."
  exit 1
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
say "- Python: $PY ($ENV_NOTE)"
say "- $("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, CUDA available: {torch.cuda.is_available()}, device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")' 2>&1 | tail -1)"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say ""
  if [ "$DRY_RUN" = 0 ]; then
    say "**No CUDA device visible to torch: nothing measured** (the CUDA tests would skip; bench and run need a GPU)."
    exit 1
  fi
  say "No CUDA device visible to torch here; the dry run lists the stages a GPU machine would run."
fi
say ""
say "## Stages"

# ratios NAME [PATTERN]: the lines of a bench_formulations stage's log matching PATTERN (RATIO), when the stage ran
ratios() {
  [ "$DRY_RUN" = 0 ] && [ -f "$OUT_DIR/$1.log" ] && grep -E "${2:-RATIO}" "$OUT_DIR/$1.log" | sed 's/^/  - /' \
    | tee -a "$SUMMARY"
}

# ---- 1. CUDA tests -----------------------------------------------------------------------------------------------
run_stage cuda_tests 90 "$PY" -m pytest -q -k cuda tests/test_cuda.py tests/test_checkpoint.py tests/test_bad_input.py
[ "$DRY_RUN" = 0 ] && [ -f "$OUT_DIR/cuda_tests.log" ] && \
  say "  - $(grep -E '(passed|failed|skipped|error)' "$OUT_DIR/cuda_tests.log" | tail -1)"

# ---- 2. Omniglot-shaped fixture ------------------------------------------------------------------------------------
FIXTURE=$WORK/omniglot
run_stage fixture 60 env PYTHONPATH="$REPO/tests:$PYTHONPATH" "$PY" - "$FIXTURE" <<'PYTHON'
"""1,623 characters x 20 drawings in the original layout (964 background + 659 evaluation), drawn in parallel."""
import io, sys, zipfile
from multiprocessing import get_context
from pathlib import Path
from omniglot_fixture import character_image

def drawings(character):
    return [(character, d, _png(character_image(character, d))) for d in range(20)]

def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
with get_context("fork").Pool() as pool:  # fork: the workers need this stdin script's functions
    images = [item for chunk in pool.map(drawings, range(1, 1624), chunksize=16) for item in chunk]
for part, first, last in (("images_background", 1, 964), ("images_evaluation", 965, 1623)):
    with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
        for character, drawing, data in images:
            if first <= character <= last:
                archive.writestr(f"{part}/Alphabet_{character:04d}/character01/{character:04d}_{drawing + 1:02d}.png", data)
print(f"fixture: {len(images)} images under {root}")
PYTHON

# ---- 3. full float32 (hardware.tf32=false, the default) vs TensorFloat-32: speed and meta-gradient difference --------
run_stage tf32 60 "$PY" scripts/bench_formulations.py tf32 --device cuda --repeats 5 --root "$FIXTURE" \
  --cases 5w1s:maml 20w1s:maml 5w1s:fomaml
ratios tf32

# ---- 3b. the meta-gradient part of the step replayed from a CUDA graph vs eager (never run before: may fail) -----
run_stage cudagraph 60 "$PY" scripts/bench_formulations.py cudagraph --device cuda --repeats 5 --root "$FIXTURE" \
  --cases 5w1s:maml 20w1s:maml 5w1s:fomaml
ratios cudagraph 'RATIO|FAILED|skipped'

# ---- 4. grouped_conv's convolution derivatives (used on CPU only) vs torch's on the GPU -------------------------
run_stage convgrad_cuda 60 "$PY" scripts/bench_formulations.py convgrad --device cuda --repeats 5 \
  --root "$FIXTURE" --cases 5w1s:maml 20w1s:maml
ratios convgrad_cuda

# ---- 5. norm_derivatives' batch-norm double backward (used on CPU only) vs torch's on the GPU -------------------
run_stage bngrad_cuda 60 "$PY" scripts/bench_formulations.py bngrad --device cuda --repeats 5 \
  --root "$FIXTURE" --cases 5w1s:maml 20w1s:maml
ratios bngrad_cuda

# ---- 6. bench_speed.py on CUDA (reference and peer columns) --------------------------------------------------------
run_stage bench_speed 200 "$PY" scripts/bench_speed.py --device cuda --iterations 10 --root "$FIXTURE" \
  --peer-root "$WORK/peer" --cases maml_5w1s fomaml_5w1s maml_20w1s fomaml_20w1s maml_sinusoid
if [ "$DRY_RUN" = 0 ] && [ -f "$OUT_DIR/bench_speed.log" ]; then
  say ""
  say '```'
  grep -E '^(device|maml_|fomaml_|SPEEDUP|PEER_SPEEDUP|NOTE)' "$OUT_DIR/bench_speed.log" | tee -a "$SUMMARY"
  say '```'
fi

# ---- 7. timed 2,000-iteration 5w1s run -----------------------------------------------------------------------------
RUN_DIR=$WORK/maml_5w1s_2000  # checkpoints stay out of $OUT; the CSVs are copied there
run_stage maml_run_5w1s_2000 140 "$PY" -m maml_runner.cli dataset=omniglot_5w1s model=conv4 \
  "dataset.root=$FIXTURE" hardware=cuda train.iterations=2000 report.enabled=false "hydra.run.dir=$RUN_DIR"
if [ "$DRY_RUN" = 0 ] && [ -f "$RUN_DIR/results.csv" ]; then
  cp "$RUN_DIR/results.csv" "$OUT_DIR/maml_5w1s_2000_results.csv"
  cp "$RUN_DIR/metrics.csv" "$OUT_DIR/maml_5w1s_2000_metrics.csv" 2>/dev/null
  line=$("$PY" - "$RUN_DIR/results.csv" 2>&1 <<'PYTHON' | tail -1
import csv, sys
row = next(csv.DictReader(open(sys.argv[1])))
print(f"{row['iterations_done']} iterations, {float(row['train_seconds']):.1f} s training "
      f"({1000 * float(row['seconds_per_iteration']):.1f} ms/iter), peak memory {row['peak_memory_mb']} MB, "
      f"device {row['device']}; test accuracy {100 * float(row['test_accuracy']):.2f} % on fixture data (meaningless)")
PYTHON
)
  say "  - $line"
fi

# ---- 8. bf16 autocast vs float32 on the whole step (docs/benchmarks.md "Kept and dropped") --------------------
run_stage bf16_autocast 60 "$PY" scripts/bench_formulations.py precision --device cuda --repeats 5 --root "$FIXTURE" \
  --cases 20w1s:maml 5w1s:maml
ratios bf16_autocast

# ---- 9. torch.compile of the grouped forward for first-order steps (hardware.compile) ------------------------
run_stage compile_first_order 90 "$PY" scripts/bench_formulations.py compile --device cuda --repeats 5 \
  --root "$FIXTURE" --cases 20w1s:fomaml 5w1s:fomaml
ratios compile_first_order

say ""
say "Total $(( $(date +%s) - START )) s of ${BUDGET} s. Logs beside this file. Data: generated fixture (not Omniglot)."
rm -rf "$WORK"
