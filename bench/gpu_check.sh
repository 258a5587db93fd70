#!/usr/bin/env bash
# The one GPU check (docs: bench/gpu_check.py). On the lent GPU machine, from the repository root:
#     bash bench/gpu_check.sh            # writes $OUT/gpu_check_summary.md and $OUT/gpu_check_logs.tar.gz
#     bash bench/gpu_check.sh --out DIR  # or into DIR
# It installs the package itself (python3 -m pip install --no-deps --no-build-isolation -e .), runs every step
# with its own timeout within 5 minutes, and exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_check.py "$@"
