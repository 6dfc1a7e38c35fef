"""Small builders for training tests: a tiny image+JSON dataset and trainer arguments."""
from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Optional

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def make_dataset(root: Path, n_images: int = 8, extra_records: Optional[list] = None, jsonl: bool = False,
                 name: str = "data") -> tuple[Path, Path]:
    """n_images solid-colour squares with one caption record each; returns (data file, image folder)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_images):
        color = list(COLORS)[i % len(COLORS)]
        Image.new("RGB", (32, 32), COLORS[color]).save(images / f"img_{i}.png")
        records.append({"id": f"r{i}", "image": f"img_{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"It is {color}."}]})
    records += extra_records or []
    path = root / (f"{name}.jsonl" if jsonl else f"{name}.json")
    if jsonl:
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path, images


def train_argv(data: Path, images: Path, clip: Path, out: Path, *extra: str) -> list[str]:
    return ["--from_scratch", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
            "--max_seq_len", "96", "--data_path", str(data), "--images_path", str(images), "--clip_path", str(clip),
            "--out_dir", str(out), "--batch_size", "4", "--num_workers", "0", "--epochs", "2", "--log_interval", "1",
            "--device", "cpu", *extra]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a test server, killing it if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def run_stage(stage, argv: list[str]) -> dict:
    """Train one stage in-process with these command-line flags, as its numbered script would; the summary."""
    from trainer.config import build_parser
    from trainer.loop import train

    return train(build_parser(stage).parse_args(argv), stage)


def count_prompt_images(monkeypatch) -> list[int]:
    """Spy on VLMChat.build_prompt: the returned list gets the image count of every prompt built."""
    from inference.chat import VLMChat

    counts: list[int] = []
    original = VLMChat.build_prompt

    def spy(self, question, history=(), n_images=1, reserve=0):
        counts.append(n_images)
        return original(self, question, history, n_images, reserve)

    monkeypatch.setattr(VLMChat, "build_prompt", spy)
    return counts


def train_to_answer(chat, question: str, image: Image.Image, answer: str, steps: int = 150) -> None:
    """Train chat.model (a tiny fp32 VLMChat model, in place) to answer `question` about `image` with `answer`
    then its end token, in the exact prompt the apps build. Its greedy answer then has clear margins, as a trained
    model's mostly does, so int8 gives the same answer as fp32 (a random model's tokens are near ties)."""
    import torch
    import torch.nn.functional as F

    from checkpoints.tokenizer import encode

    prompt = chat.build_prompt(question, (), 1, reserve=64)
    target = encode(chat.tokenizer, answer) + [chat.eos_id]
    ids = torch.tensor([prompt + target])
    features = chat.image_features([image]).detach()
    model = chat.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small only wait on each other across threads
    try:
        for _ in range(steps):
            logits = model(ids, features).logits[0, len(prompt) - 1:-1]
            loss = F.cross_entropy(logits, torch.tensor(target))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def load_script(relative_path: str, module_name: str):
    """A numbered or helper script (e.g. 3-eval_chat.py, whose name is no module name) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parents[1] / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
