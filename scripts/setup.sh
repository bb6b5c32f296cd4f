#!/usr/bin/env bash
# Installs deepnlme and its dependencies into the current Python (CPU build of PyTorch first,
# so that no CUDA packages are pulled in), plus the test tools and the Hydra sweeper/launcher
# plugins (Optuna, SLURM via submitit); torch stays the pinned CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,sweep]" "torch==2.13.0"
