"""Create the project's virtual environment and install requirement files into it (what `make` runs).

    python3 scripts/install_venv.py --venv .venv -r requirements-demo.txt

uv installs when it can: on a fresh 2-core machine it installed the demo's packages (torch included) in 33 s where
pip took 46 s (bench/RESULTS.md). uv is itself installed into the venv by pip, and it is told where
pip would look (pip's own configuration: index URLs, find-links, constraints, from its files and PIP_* variables),
so both install the same releases from the same places. Where uv cannot be installed or fails, pip installs
instead, and the line before says why. MINIMIND_INSTALLER=pip skips uv.

Bytecode: uv compiles every installed module, as pip does (--compile-bytecode). Without it the install took 10 s
instead of 33 s, but where Python may not write bytecode itself (PYTHONDONTWRITEBYTECODE=1, as on the machine measured) each process
then compiled what it imported every time it started: about 5 s for torch and transformers.

Standard library only: it runs before the venv has anything in it.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

# pip's settings that choose what gets installed from where, and the uv flag that says the same
PIP_TO_UV = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
             "constraint": "--constraint"}
# the sections of pip's configuration that apply to `pip install`, weakest first (PIP_* variables last)
SCOPES = ("global", "install", ":env:")
CONFIG_LINE = re.compile(r"^(?P<scope>[^.]*)\.(?P<key>[a-z-]+)='(?P<value>.*)'$")


def pip_settings(config_list: str) -> dict[str, str]:
    """The effective value of each key in `pip config list` output (later scopes win; sections named after a pip
    command other than install do not apply to it)."""
    found: dict[str, tuple[int, str]] = {}
    for line in config_list.splitlines():
        match = CONFIG_LINE.match(line.strip())
        if not match or match["scope"] not in SCOPES:
            continue
        rank = SCOPES.index(match["scope"])
        if match["key"] not in found or rank >= found[match["key"]][0]:
            found[match["key"]] = (rank, match["value"])
    return {key: value for key, (_, value) in found.items()}


def uv_flags(settings: dict[str, str]) -> list[str]:
    """uv pip install flags that make uv install what pip would from the same sources. Several values of one key
    are separated by white space (pip's rule). pip weighs every index alike; uv's unsafe-best-match does too."""
    flags = ["--index-strategy", "unsafe-best-match"]
    for key, flag in PIP_TO_UV.items():
        for value in settings.get(key, "").split():
            flags += [flag, value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        flags.append("--no-index")
    return flags


def uv_env(settings: dict[str, str]) -> dict[str, str]:
    """The environment for uv: pip's certificate bundle, where pip has one, as SSL_CERT_FILE."""
    env = dict(os.environ)
    if settings.get("cert") and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = settings["cert"]
    return env


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith("WARNING:")]
    return lines[-1].strip() if lines else f"exit {done.returncode}"


def requirement_args(requirements: list[str]) -> list[str]:
    return [arg for path in requirements for arg in ("-r", path)]


def with_uv(python: str, uv: str, requirements: list[str]) -> str | None:
    """Install with uv; None when it worked, else why not (one line)."""
    if not os.path.exists(uv):
        done = run([python, "-m", "pip", "install", "-q", "uv"])
        if done.returncode != 0:
            return f"uv could not be installed ({last_line(done)})"
    config = subprocess.run([python, "-m", "pip", "config", "list"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if config.returncode != 0:  # without pip's settings uv could install from other places than pip would
        return f"pip's configuration could not be read ({last_line(config)})"
    settings = pip_settings(config.stdout)
    done = run([uv, "pip", "install", "-q", "--compile-bytecode", "--python", python, *uv_flags(settings),
                *requirement_args(requirements)], uv_env(settings))
    if done.returncode != 0:
        print(done.stdout, end="")
        return f"uv pip install failed ({last_line(done)})"
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", default=".venv")
    p.add_argument("-r", dest="requirements", action="append", required=True, help="a requirements file (repeatable)")
    args = p.parse_args()
    started = time.perf_counter()
    python = os.path.join(args.venv, "bin", "python")
    if not os.path.exists(python):
        done = run([sys.executable, "-m", "venv", args.venv])
        if done.returncode != 0:
            print(f"install: could not create {args.venv}: {last_line(done)}", file=sys.stderr)
            return done.returncode
    why_not = "MINIMIND_INSTALLER=pip" if os.environ.get("MINIMIND_INSTALLER") == "pip" else \
        with_uv(python, os.path.join(args.venv, "bin", "uv"), args.requirements)
    if why_not is not None:
        print(f"install: {why_not}; installing with pip instead", flush=True)
        done = subprocess.run([python, "-m", "pip", "install", "-q", *requirement_args(args.requirements)])
        if done.returncode != 0:
            return done.returncode
    print(f"install: {', '.join(args.requirements)} into {args.venv} in {time.perf_counter() - started:.0f} s "
          f"({'pip' if why_not else 'uv'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
