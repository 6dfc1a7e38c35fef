"""A DDP step in which one rank's micro-batch lost every image (each failed to decode) while the other's did not:
the rank with nothing to train still takes part in the gradient all-reduce, so the run ends instead of hanging."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import numpy as np
from conftest import ROOT
from helpers import free_port, make_dataset, train_argv
from PIL import Image


def _truncated_png() -> bytes:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]  # a whole header, a cut body: it fails when decoded


def test_ddp_step_where_one_rank_lost_its_whole_batch_does_not_hang(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 2)
    (images / "img_1.png").write_bytes(_truncated_png())
    # one sample per rank and step: every step, one rank gets the good record and the other the bad one
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "1-pretrain_vlm.py"), *train_argv(data, images, tiny_clip_dir, tmp_path / "o",
                                                        "--batch_size", "1", "--epochs", "3")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks wait in a collective and would outlive the test
        out, err = proc.communicate()
        raise AssertionError("the run hung: " + out[-2000:] + err[-2000:])
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "replicas identical across 2 ranks" in out
    assert "3 optimizer steps" in out
