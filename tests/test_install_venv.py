"""scripts/install_venv.py: uv is told where pip would look, and the install falls back to pip, saying why."""
from __future__ import annotations

import os
import subprocess
import sys

from scripts.install_venv import pip_settings, uv_env, uv_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_LIST = """\
:env:.find-links='/opt/env-wheels'
global.cert='/etc/ssl/certs/ca.crt'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///opt/a/simple https://mirror.example/simple'
global.find-links='/opt/wheels'
global.timeout='60'
install.index-url='https://index.example/simple'
freeze.index-url='https://not-for-install.example/simple'
"""


def test_pip_settings_take_the_strongest_scope():
    settings = pip_settings(CONFIG_LIST)
    assert settings["find-links"] == "/opt/env-wheels"  # PIP_FIND_LINKS beats the file
    assert settings["index-url"] == "https://index.example/simple"  # [install] applies, [freeze] does not
    assert settings["constraint"] == "/etc/pip/constraints.txt"


def test_uv_flags_say_what_pip_would_use():
    flags = uv_flags(pip_settings(CONFIG_LIST))
    pairs = list(zip(flags[::2], flags[1::2]))
    assert ("--index-strategy", "unsafe-best-match") in pairs
    assert ("--index-url", "https://index.example/simple") in pairs
    assert ("--extra-index-url", "file:///opt/a/simple") in pairs
    assert ("--extra-index-url", "https://mirror.example/simple") in pairs
    assert ("--find-links", "/opt/env-wheels") in pairs and ("--find-links", "/opt/wheels") not in pairs
    assert ("--constraint", "/etc/pip/constraints.txt") in pairs
    assert "--timeout" not in flags and "60" not in flags
    assert uv_flags({"no-index": "true"})[-1] == "--no-index"
    assert uv_flags({}) == ["--index-strategy", "unsafe-best-match"]


def test_uv_env_passes_pips_certificates(monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert uv_env({"cert": "/etc/ssl/certs/ca.crt"})["SSL_CERT_FILE"] == "/etc/ssl/certs/ca.crt"
    monkeypatch.setenv("SSL_CERT_FILE", "/mine.pem")
    assert uv_env({"cert": "/etc/ssl/certs/ca.crt"})["SSL_CERT_FILE"] == "/mine.pem"


def test_pip_installs_when_told_to(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install\n")
    venv = tmp_path / "venv"
    done = subprocess.run([sys.executable, "scripts/install_venv.py", "--venv", str(venv), "-r", str(requirements)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MINIMIND_INSTALLER": "pip"},
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installing with pip instead" in done.stdout and "(pip)" in done.stdout
    assert (venv / "bin" / "python").exists() and not (venv / "bin" / "uv").exists()


def test_uv_installs_into_a_fresh_venv(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install\n")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "MINIMIND_INSTALLER"}
    done = subprocess.run([sys.executable, "scripts/install_venv.py", "--venv", str(venv), "-r", str(requirements)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(uv)" in done.stdout and "instead" not in done.stdout
    assert (venv / "bin" / "uv").exists()
