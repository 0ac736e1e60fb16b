#!/usr/bin/env bash
# The test command from the README: installs what the tests need, then runs them (CPU only, no network), on the
# pinned torch and then on torch 2.11.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
python -m pytest tests -q "$@"
# Then a lighter pass on torch 2.11, the GPU machine's version, in its own venv (made once: a 1.9 GB download):
# code must run there too. Skipped when pytest arguments select a subset, or with GFS_TORCH211=0, and (with a
# warning) where its wheels cannot be installed: the main pass above is then the verdict.
if (($# == 0)) && [[ ${GFS_TORCH211:-1} != 0 ]]; then
  if bash scripts/test_torch211.sh --venv; then
    bash scripts/test_torch211.sh
  else
    echo "warning: the torch 2.11 pass is skipped: its venv could not be installed (see above)" >&2
  fi
fi
