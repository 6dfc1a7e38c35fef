"""The export's model card (README.md) and its upload to the Hugging Face Hub."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from model.config import LMConfig

from .files import ExportError


V1_DESCRIPTION = ("A MiniMind-V vision-language model: the MiniMind decoder with a projection of frozen CLIP "
                  "ViT-B/32 features spliced over a 50-token image placeholder.")
V3_DESCRIPTION = ("A minimind-3v vision-language model: the Qwen3-style MiniMind decoder with an MLP projection of "
                  "frozen SigLIP2 (base, patch 32, 256x256) features spliced over a run of 64 `<|image_pad|>` "
                  "tokens per image.")


def training_facts(ckpt: str) -> dict[str, Any]:
    """What the files beside a checkpoint say about its training: `<name>_run.json` (data, batch, epochs,
    written by the trainer), `<name>_log.jsonl` (steps, last loss) and the demo's `demo_summary.json`
    (held-out accuracy) when it names this checkpoint. Missing or unreadable files give no facts."""
    base = os.path.splitext(ckpt)[0]
    facts: dict[str, Any] = {}
    try:
        facts["run"] = json.loads(Path(base + "_run.json").read_text())
    except (OSError, ValueError):
        pass
    try:
        rows = [json.loads(line) for line in Path(base + "_log.jsonl").read_text().splitlines() if line.strip()]
        steps = [r for r in rows if isinstance(r, dict) and "step" in r]
        if steps:
            facts["log"] = {"steps": steps[-1]["step"], "last_loss": steps[-1].get("loss"),
                            "epochs": steps[-1].get("epoch", 0) + 1}
    except (OSError, ValueError):
        pass
    try:
        summary = json.loads((Path(ckpt).parent / "demo_summary.json").read_text())
        if os.path.basename(str(summary.get("checkpoint", ""))) == os.path.basename(ckpt):
            facts["eval"] = {k: summary[k] for k in ("accuracy", "n", "majority_baseline") if k in summary}
    except (OSError, ValueError, AttributeError):
        pass
    return facts


def model_card(config: LMConfig, n_params: int, facts: dict[str, Any], license: str, repo_id: str) -> str:
    """README.md of the export: YAML metadata, then the config, size, training and evaluation facts."""
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "use_moe", "vision_dim",
              "vision_proj_bias") + (("generation",) if config.generation == "3v" else ())
    tower = "SigLIP2" if config.generation == "3v" else "CLIP"
    lines = ["---", f"license: {license}", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags:", "  - minimind-v", "  - vision-language", "  - image-text-to-text", "  - custom_code", "---",
             "", f"# {repo_id.split('/')[-1]}", "",
             V3_DESCRIPTION if config.generation == "3v" else V1_DESCRIPTION, "",
             f"Parameters: **{n_params:,}** (tied embedding counted once; the {tower} tower not included).", "",
             "| config | value |", "|---|---|"]
    lines += [f"| {f} | {getattr(config, f)} |" for f in fields]
    lines += ["", "## Training", ""]
    run, log = facts.get("run"), facts.get("log")
    if run:
        lines += [f"- {k}: {v}" for k, v in run.items()]
    if log:
        lines += [f"- optimizer steps: {log['steps']} (epochs reached: {log['epochs']}); last logged loss: "
                  f"{log['last_loss']}"]
    if not run and not log:
        lines += ["No training record was found beside the checkpoint."]
    lines += ["", "## Evaluation", ""]
    ev = facts.get("eval")
    lines += ([f"Exact-match accuracy {ev.get('accuracy')} on {ev.get('n')} held-out questions (majority baseline "
               f"{ev.get('majority_baseline')})."] if ev else ["No evaluation figures were recorded."])
    lines += ["", "## Usage", "", "```python", "from PIL import Image",
              "from transformers import AutoModelForCausalLM, AutoProcessor",
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
              f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)',
              'inputs = processor(images=[Image.open("cat.png")], text=[{"role": "user", "content": '
              '"What is in the picture?"}], return_tensors="pt")',
              'new = model.generate(**inputs, max_new_tokens=64)[:, inputs["input_ids"].shape[1]:]',
              "print(processor.batch_decode(new, skip_special_tokens=True))", "```", "",
              f"`pixel_values` need the {tower} vision tower in `vision_encoder/` (exported with `--clip_path`); "
              "otherwise pass `image_features`.", ""]
    return "\n".join(lines)


def hub_token(repo_id: str) -> str:
    """The Hugging Face token to push repo_id with; a bad repo id or no token is an ExportError."""
    import huggingface_hub

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"--push_to_hub takes USER/NAME (or ORG/NAME), got {repo_id!r}")
    token = huggingface_hub.get_token()
    if not token:
        raise ExportError("no Hugging Face token is set: run `hf auth login` or set HF_TOKEN, then rerun with "
                          "--push_to_hub")
    return token


def push_to_hub(out_dir: Path, repo_id: str, private: bool) -> str:
    """Create (or reuse) the model repo and upload the export; returns the repo URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=hub_token(repo_id))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="model",
                          commit_message="Upload MiniMind-V export")
    except Exception as e:  # network and Hub errors: one line, the local export stays
        raise ExportError(f"pushing {out_dir} to {repo_id} failed: {type(e).__name__}: {e}") from None
    return str(url)

