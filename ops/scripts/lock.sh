#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml's dependencies (every extra) afresh in a
# scratch virtual environment and record the exact versions pip chose. demo.sh, test.sh and CI
# install with the lock as pip constraints, so a fresh machine gets the versions CI tested.
# Run it after changing a dependency in pyproject.toml, then run the tests and commit both.
set -euo pipefail
cd "$(dirname "$0")/../.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install --quiet --disable-pip-version-check -e ".[dev,bench]" \
  >"$scratch/pip.log" 2>&1 || { cat "$scratch/pip.log" >&2; exit 2; }
{
  echo "# The exact versions CI tested: pip constraints for every install of Switchyard."
  echo "# Refresh with: bash ops/scripts/lock.sh (after changing pyproject.toml's dependencies)."
  "$scratch/venv/bin/pip" freeze --exclude-editable --disable-pip-version-check
} >requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
