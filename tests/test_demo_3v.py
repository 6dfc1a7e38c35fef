"""`make demo GENERATION=3v` at the CI profile (same scripts): minimind-3v's network must learn from the images.

The slowest test here: two training stages and the evaluation of the CI profile (its time is in
docs/generations.md, "Training 3v")."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_demo_3v_pipeline_answers_colour_questions_from_the_image(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/demo.py", "--profile", "ci", "--generation", "3v", "--out_dir", str(out),
           "--data_root", str(tmp_path / "dataset"), "--loss_plot", str(tmp_path / "loss.png"),
           "--clip_dir", str(tmp_path / "clip_model")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "demo_summary_3v.json").read_text())
    assert summary["generation"] == "3v" and summary["n"] >= 250, summary
    assert summary["accuracy"] > summary["majority_baseline"] + 0.1, summary
    # The yes/no questions' wording alone gets about 0.89 of them right; a colour question needs the image.
    colour = summary["per_type"]["colour"]
    assert colour["accuracy"] > colour["majority_baseline"] + 0.2, summary
    assert sum(t["n"] for t in summary["per_type"].values()) == summary["n"]
    n_photos = len(list((tmp_path / "dataset" / "eval_images").iterdir()))
    assert summary["eval_images_answered"] == n_photos >= 10
    sft_log = [json.loads(line) for line in (out / "sft_vlm_64_log.jsonl").read_text().splitlines()]
    assert [r for r in sft_log if "val_accuracy" in r], sft_log[-3:]
    assert "UNTRAINED STAND-IN" in res.stdout and (tmp_path / "loss.png").stat().st_size > 1000
    assert summary["vision_encoder"].startswith(str(tmp_path / "clip_model")), summary["vision_encoder"]
