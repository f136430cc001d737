#!/usr/bin/env bash
# Which released-code switches carry the difference between a finn2017 preset and the runner's defaults
# (docs/protocols.md): trains the runner's defaults, the faithful preset, and the preset with one group of switches
# set back to the runner's default at a time (same seed, same 600 test tasks), then compares every run paired with
# the runner's defaults and with the faithful preset (scripts/aggregate.py: per-task differences, bootstrap CI).
#
#   scripts/protocol_effects.sh 5w1s 1000                       # all variants, 1,000 iterations each
#   VARIANTS="0_defaults 1_faithful" scripts/protocol_effects.sh 20w1s 1000 hardware.threads=1
#
# Extra arguments are overrides for every run. Finished runs are reused and an interrupted one continues from its
# last.pt (train.resume=true): rerun the same command to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
setting=$1; iterations=$2; shift 2
out=outputs/protocol_effects/finn2017_maml_${setting}_${iterations}
common=("dataset.root=${OMNIGLOT_ROOT:-../shared/data/omniglot}" "train.iterations=$iterations" report.enabled=false "$@")
preset=experiment=finn2017_maml_${setting}
declare -A variants=(
  [0_defaults]="algorithm=maml dataset=omniglot_${setting}"
  [1_faithful]="$preset"
  [2_mean_loss]="$preset algorithm.loss_reduction=mean"
  [3_affine_bn]="$preset model.bn_scale=true model.bn_eps=1e-5 model.bn_adapted=true"
  [4_lanczos_images]="$preset dataset.image_resize=lanczos"
  [5_pytorch_init]="$preset model.init=pytorch model.head_init=same"
  [5b_xavier_head]="$preset model.head_init=same"
  [6_symmetric_padding]="$preset model.padding=symmetric"
)
for name in ${VARIANTS:-$(printf '%s\n' "${!variants[@]}" | sort)}; do
  [ -f "$out/$name/results.csv" ] && continue
  # shellcheck disable=SC2086
  .venv/bin/maml-run ${variants[$name]} "${common[@]}" train.resume=true hydra.run.dir="$out/$name"
done
# The tested checkpoint: the faithful run's best-validation checkpoint instead of its last (no retraining: a copy of
# the finished run resumed at its last iteration only runs the test).
if [ -f "$out/1_faithful/results.csv" ] && [ ! -f "$out/7_best_checkpoint/results.csv" ] \
    && [[ " ${VARIANTS:-7_best_checkpoint} " == *" 7_best_checkpoint "* ]]; then
  rm -rf "$out/7_best_checkpoint" && cp -r "$out/1_faithful" "$out/7_best_checkpoint"
  .venv/bin/maml-run "$preset" eval.checkpoint=best train.resume=true "${common[@]}" hydra.run.dir="$out/7_best_checkpoint"
fi
.venv/bin/python scripts/aggregate.py "$out" --out "$out/vs_defaults" > /dev/null
.venv/bin/python scripts/aggregate.py "$out" --out "$out/vs_faithful" --baseline run=1_faithful > /dev/null
cat "$out/vs_defaults/aggregate.md"
echo; echo "# Against the faithful preset"; sed -n '/^## Paired/,$p' "$out/vs_faithful/aggregate.md"
