"""A much smaller run of the `make demo` pipeline (same scripts, CI profile): it must learn something real."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT
from helpers import load_script


def test_demo_pipeline_beats_the_majority_baseline(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/demo.py", "--profile", "ci", "--out_dir", str(out),
           "--data_root", str(tmp_path / "dataset"), "--loss_plot", str(tmp_path / "loss.png"),
           "--clip_dir", str(tmp_path / "clip_model")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    n_photos = len(list((tmp_path / "dataset" / "eval_images").iterdir()))
    assert summary["eval_images_answered"] == n_photos >= 10
    assert summary["n"] >= 250
    assert summary["accuracy"] > summary["majority_baseline"] + 0.1, summary
    assert {"yes/no", "colour", "shape"} <= set(summary["per_type"]), summary
    # The yes/no questions' wording alone gets most of them right; a colour question needs the image.
    colour = summary["per_type"]["colour"]
    assert colour["accuracy"] > colour["majority_baseline"] + 0.2, summary
    assert sum(t["n"] for t in summary["per_type"].values()) == summary["n"]
    sft_log = [json.loads(line) for line in (out / "64_vlm_sft_log.jsonl").read_text().splitlines()]
    assert [r for r in sft_log if "val_accuracy" in r], sft_log[-3:]  # the accuracy curve of the plot
    assert "accuracy: " in res.stdout and "UNTRAINED STAND-IN" in res.stdout
    assert (tmp_path / "loss.png").stat().st_size > 1000
    # the stand-in was built in the folder given, leaving the working tree's encoders alone
    assert summary["vision_encoder"].startswith(str(tmp_path / "clip_model")), summary["vision_encoder"]


def test_each_stand_in_depth_has_its_own_folder():
    demo = load_script("scripts/demo.py", "demo_script")
    assert demo.stand_in_path(0) == demo.STAND_IN_CLIP_PATH  # the full profile's: the path the README names
    assert demo.stand_in_path(1) != demo.stand_in_path(0)  # the CI profile never replaces it
    assert demo.stand_in_path(1, "/tmp/x") == "/tmp/x/stand_in_clip_vit_b32_1layer"


def test_a_profile_s_compiled_stages_get_compile_and_the_others_do_not(tmp_path):
    """A profile's `compile` names the stages trained with --compile. Neither shipped profile compiles: on a fresh
    clone the compile cost more than the faster steps saved at the demo's size."""
    demo = load_script("scripts/demo.py", "demo_script")
    (tmp_path / "sft.json").write_text(json.dumps([{"image": "a.png"}] * 4))
    (tmp_path / "val.json").write_text(json.dumps([{"image": "b.png"}]))
    assert demo.PROFILES["full"]["compile"] == () and demo.PROFILES["ci"]["compile"] == ()
    both = {**demo.PROFILES["full"], "compile": ("pretrain", "sft")}
    for cfg, compiled in ((both, True), (demo.PROFILES["full"], False), (demo.PROFILES["ci"], False)):
        profile = cfg["compile"]
        pretrain = demo.pretrain_command(cfg, [], "pretrain.json")
        sft = demo.sft_command(cfg, [], str(tmp_path / "sft.json"), str(tmp_path / "val.json"), "images")
        assert ("--compile" in pretrain, "--compile" in sft) == (compiled, compiled), profile
