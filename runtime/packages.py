"""Which optional Python packages are installed: `make demo` installs requirements-demo.txt only, and the parts
that need more (the API server, parquet data, wandb) say so in one line instead of failing on an import."""
from __future__ import annotations

import importlib.util
from typing import Iterable, Optional


def missing_packages(modules: Iterable[str], needed_for: str) -> Optional[str]:
    """One line naming the modules of `modules` that are not installed, what needs them and how to install them;
    None when all are there."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"{needed_for} needs the Python package(s) {', '.join(missing)}, which `make demo` does not install "
            f"(requirements-demo.txt): run `make install` or `pip install -r requirements.txt`")
