#!/usr/bin/env bash
# Reptile's inner optimizer state (docs/protocols.md, Nichol et al. 2018): the nichol2018_reptile_5w1s preset
# (supervised-reptile's persistent inner Adam) against the same preset with a fresh Adam per task, same seed, same
# 600 test tasks (eval.num_tasks=600 instead of the preset's 10,000), then the paired comparison.
#
#   scripts/reptile_state_effect.sh 5000 hardware=cpu hardware.threads=1     # ~20 min per run on one core
#
# Extra arguments are overrides for both runs; rerunning continues an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=$1; shift
out=outputs/protocol_effects/nichol2018_reptile_5w1s_$iterations
for state in persistent fresh; do
  [ -f "$out/$state/results.csv" ] && continue
  .venv/bin/maml-run experiment=nichol2018_reptile_5w1s "dataset.root=${OMNIGLOT_ROOT:-../shared/data/omniglot}" \
    train.iterations="$iterations" eval.num_tasks=600 report.enabled=false algorithm.inner_optimizer_state=$state \
    train.resume=true "$@" hydra.run.dir="$out/$state"
done
.venv/bin/python scripts/aggregate.py "$out" --out "$out/compare" --baseline run=persistent > /dev/null
sed -n '/^## Paired/,$p' "$out/compare/aggregate.md"
