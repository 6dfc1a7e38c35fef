"""The files of an export: which code ships, and how the output folder is checked and filled.

An export is written into a staging folder first and then moved into `--out` entry by entry, so that:
  - `--out` must be a folder, or a path whose existing ancestors are folders (else a one-line ExportError);
  - a non-empty `--out` is refused unless `overwrite`, and the message names the entries the export would replace;
  - even with `overwrite`, only regular files are replaced: an output never takes the place of a folder, a
    symlink or a special file (FIFO, socket, device), which could hang the writer or destroy data;
  - nothing of the old folder is touched before the whole export has been written and checked.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable

WRAPPER_FILES = ("hf_model.py", "processing_minimind_v.py")  # hf_export/: what auto_map names
VISION_SUBFOLDER = "vision_encoder"
ROOT = Path(__file__).resolve().parents[1]


def network_files(root: Path = ROOT) -> tuple[str, ...]:
    """The model/ files the wrappers import, directly or through each other (the network's own relative imports
    included), sorted: exactly the network code an export ships beside WRAPPER_FILES."""
    found: set[str] = set()
    todo = [root / "hf_export" / name for name in WRAPPER_FILES]
    while todo:
        path = todo.pop()
        in_model = path.parent.name == "model"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module.startswith("model.") or (in_model and node.level == 1):
                name = node.module.split(".")[-1 if node.level else 1] + ".py"
                if name not in found:
                    found.add(name)
                    todo.append(root / "model" / name)
    return tuple(sorted(found))


CODE_FILES = network_files() + WRAPPER_FILES
# What an export writes at its top level (the tokenizer's files vary with the tokenizer: the move step checks the
# actual names again).
EXPORT_NAMES = ("README.md", "config.json", "generation_config.json", "model.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "processor_config.json", "preprocessor_config.json",
                VISION_SUBFOLDER) + CODE_FILES
PROJECT_PACKAGES = ("model", "checkpoints", "data_pipeline", "inference", "evaluation", "trainer", "hf_export")
STAGING_PREFIX = ".export-staging-"


class ExportError(Exception):
    """A conversion that cannot be done; the message is one line for the user."""


def copy_model_code(out: Path) -> None:
    """Copy the network (model/) and the transformers wrappers (hf_export/) into the export, flat, so it loads as
    remote code: the wrappers' `from model.X import` becomes `from .X import`. Nothing else of the project ships."""
    from transformers.dynamic_module_utils import get_relative_import_files

    for name in CODE_FILES:
        src = ROOT / ("hf_export" if name in WRAPPER_FILES else "model") / name
        text = re.sub(r"^(\s*)from model\.(\w+) import", r"\1from .\2 import", src.read_text(), flags=re.M)
        if re.search(rf"^\s*(from|import) ({'|'.join(PROJECT_PACKAGES)})\b", text, flags=re.M):
            raise ExportError(f"{src} imports project code outside the network, which an export cannot ship")
        (out / name).write_text(text)
    needed = {Path(p).name for name in WRAPPER_FILES for p in get_relative_import_files(out / name)}
    if needed - set(CODE_FILES):  # a new relative import in the model code must be shipped too
        raise ExportError(f"the model code imports {sorted(needed - set(CODE_FILES))}, which CODE_FILES does not copy")


def _kind(path: Path) -> str:
    """What is at path, in words, without following a symlink."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return "a special file (FIFO, socket or device)"


def check_out_dir(out: Path, overwrite: bool, names: Iterable[str] = EXPORT_NAMES) -> None:
    """Refuse an output path the export cannot write safely (see the module docstring), before any work."""
    if os.path.lexists(out):
        if not out.is_dir():
            raise ExportError(f"--out {out}: it exists and is {_kind(out)}, not a folder")
        entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX))
        if entries and not overwrite:
            replaced = [n for n in entries if n in set(names)]
            what = f"it would replace {', '.join(replaced)}" if replaced else "it would replace none of them"
            raise ExportError(f"--out {out}: the folder is not empty ({len(entries)} entries; {what}); pass "
                              "--overwrite to write into it anyway, or choose a new folder")
        check_replaceable(out, [n for n in names if n != VISION_SUBFOLDER], [VISION_SUBFOLDER])
        return
    for parent in out.parents:  # the nearest existing ancestor must be a folder
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ExportError(f"--out {out}: {parent} is {_kind(parent)}, not a folder")
            return


def check_replaceable(out: Path, files: Iterable[str], folders: Iterable[str] = ()) -> None:
    """Raise unless each of `files` in out is absent or a regular file, and each of `folders` absent or a folder."""
    for name, wanted in [(n, "a file") for n in files] + [(n, "a folder") for n in folders]:
        target = out / name
        if os.path.lexists(target) and _kind(target) != wanted:
            raise ExportError(f"--out {out}: {target} is {_kind(target)}; the export writes {wanted} there and "
                              "never replaces anything else: move it away first")


def staging_dir(out: Path) -> Path:
    """A fresh, empty folder inside `out` (created if needed) to write the export into before it is moved."""
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))


def move_into(staged: Path, out: Path) -> None:
    """Move everything in `staged` into `out` (regular files replace regular files; a subfolder merges into the
    folder of the same name), after checking every target first, then remove `staged`."""
    files = [p.relative_to(staged) for p in sorted(staged.rglob("*")) if not p.is_dir()]
    folders = [p.relative_to(staged) for p in sorted(staged.rglob("*")) if p.is_dir()]
    for folder in folders:
        check_replaceable(out, [], [str(folder)])
    for name in files:
        check_replaceable(out, [str(name)])
    for folder in folders:
        (out / folder).mkdir(exist_ok=True)
    for name in files:
        os.replace(staged / name, out / name)
    shutil.rmtree(staged)
