#!/usr/bin/env bash
# The nightly job (what .github/workflows/nightly.yml runs on a self-hosted KVM runner):
# install what dynamem needs (scripts/setup.sh install), build or find the guest, then
# `dynamem nightly`: run the nightly suite, commit its manifest to the timeline, asv run,
# asv publish. Arguments go to `dynamem nightly`, e.g. --root DIR to keep the timeline
# and asv results outside a checkout that CI cleans.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh install
export PATH="$PWD/.venv/bin:$PATH"
dynamem guest build
dynamem doctor || true  # prints the accelerator and why; the run records it either way
exec dynamem nightly "$@"
