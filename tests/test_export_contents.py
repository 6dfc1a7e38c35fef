"""What an export ships, and what loading it changes: only the network's files and the two wrappers (nothing of the
CPU engine or the rest of the project), and neither transformers' remote-code load nor our own loader touches
Pillow's global limits. An export made before (code files with relative imports) loads in our own loader, which
reads the weights and config and never imports a downloaded file."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, tiny_config

import export_model
from checkpoints.checkpoint import load_model, save_checkpoint
from hf_export.files import WRAPPER_FILES
from model.vlm import MiniMindVLM

NETWORK_FILES = {p.name for p in (ROOT / "model").glob("*.py")} - {"__init__.py"}
ENGINE_FILES = {p.name for p in (ROOT / "inference").rglob("*.py")} | \
    {p.name for p in (ROOT / "checkpoints").glob("*.py")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer, tiny_clip_dir):
    tmp = tmp_path_factory.mktemp("contents")
    torch.manual_seed(0)
    native = MiniMindVLM(tiny_config(tokenizer)).eval()
    save_checkpoint(native, tmp / "tiny.pth", tokenizer=PROJECT_TOKENIZER)
    return native, export_model.export(str(tmp / "tiny.pth"), str(tmp / "hf"), TOKENIZER_PATH, str(tiny_clip_dir))


def test_an_export_ships_only_the_network_and_the_two_wrappers(exported):
    _, out = exported
    code = {p.relative_to(out).as_posix() for p in out.rglob("*.py")}
    assert set(WRAPPER_FILES) <= code
    assert code - set(WRAPPER_FILES) <= NETWORK_FILES, code - set(WRAPPER_FILES) - NETWORK_FILES
    assert not code & (ENGINE_FILES - NETWORK_FILES - set(WRAPPER_FILES))
    for name in code:  # each imports only its neighbours (relatively), never the project's packages
        tree = ast.parse((out / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in code, f"{name} imports .{node.module}, which the export lacks"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                roots = {m.split(".")[0] for m in modules}
                assert not roots & {"model", "checkpoints", "inference", "hf_export", "data_pipeline", "evaluation",
                                    "trainer", "runtime"}, f"{name}: {ast.unparse(node)}"
    folders = {p.name for p in out.iterdir() if p.is_dir()}
    assert folders == {"vision_encoder"}


PILLOW_PROBE = """
import json, sys
from PIL import Image, PngImagePlugin
def limits():
    return [Image.MAX_IMAGE_PIXELS, PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY]
before = limits()
{load}
print(json.dumps({{"before": before, "after": limits()}}))
"""
LOADERS = {
    "transformers": "from transformers import AutoModelForCausalLM, AutoProcessor\n"
                    "AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
                    "AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)",
    "our loader": f"sys.path.insert(0, {str(ROOT)!r})\n"
                  "from checkpoints.checkpoint import load_model\nload_model(sys.argv[1])",
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_loading_an_export_leaves_pillows_limits_alone(exported, loader, tmp_path):
    _, out = exported
    proc = subprocess.run([sys.executable, "-c", PILLOW_PROBE.format(load=LOADERS[loader]), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["after"] == seen["before"], f"{loader} changed Pillow's limits: {seen}"


def test_the_probe_sees_a_changed_limit(exported, tmp_path):
    # the check itself can fail: a load that sets a Pillow limit is caught
    _, out = exported
    probe = PILLOW_PROBE.format(load="PngImagePlugin.MAX_TEXT_CHUNK = 1")
    seen = json.loads(subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True,
                                     timeout=60, cwd=tmp_path).stdout)
    assert seen["after"] != seen["before"]


def test_an_older_export_loads_in_our_loader_without_importing_its_code(exported, tmp_path):
    native, out = exported
    older = tmp_path / "older"
    older.mkdir()
    for path in out.iterdir():
        if path.is_file() and path.suffix != ".py":
            (older / path.name).write_bytes(path.read_bytes())
    # code files as earlier exports shipped them: relative imports, here made to fail loudly if ever imported
    for name in ("config.py", "decoder.py", "feed_forward.py", "vlm.py", "vision.py", *WRAPPER_FILES):
        (older / name).write_text("from .decoder import MiniMindLM\nraise SystemExit('imported a shipped file')\n")
    model = load_model(str(older))
    ids = torch.randint(100, 6400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, native(ids).logits)
