#!/usr/bin/env bash
# triserve vs the real Triton 2.51 on the anchors' repository, measured by the same
# perf_analyzer in one run (see bench/README.md). Arguments go to bench/core_vs_triton.py,
# e.g. --servers triton, --concurrency 1 4, --interval-ms 2000, --starts 1.
# First run: start.sh installs nvidia-pytriton into $TRITON_ROOT/venv and
# perf_analyzer_setup.sh unpacks perf_analyzer (a few minutes, needs PyPI + the Debian mirror).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
ANCHOR_DIR="${TRITON_ANCHORS:-/work/shared/anchors/triton}"
TRITON_ROOT="${TRITON_ROOT:-${ANCHORS:-$HOME/.cache/anchors}/triton}"  # as start.sh
export TRITON_ANCHORS="$ANCHOR_DIR" TRITON_ROOT
PA="$TRITON_ROOT/bin/perf_analyzer"

# perf_analyzer_setup.sh can write a wrapper that does not run (its glibc check races
# under pipefail), so check the wrapper itself and redo the setup once if needed.
pa_works() { [ -x "$PA" ] && "$PA" --version >/dev/null 2>&1; }
for attempt in 1 2; do
  pa_works && break
  echo "[core_vs_triton] setting up perf_analyzer (attempt $attempt)" >&2
  bash "$ANCHOR_DIR/perf_analyzer_setup.sh" >&2
done
pa_works || { echo "[core_vs_triton] $PA does not run; see perf_analyzer_setup.sh output" >&2; exit 1; }

cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m bench.core_vs_triton "$@"
