"""An OpenAI-compatible chat server for a trained MiniMind-V model (FastAPI + uvicorn).

    python serve_openai_api.py --ckpt out/512_vlm_sft.pth --clip_path model/clip_model/clip-vit-base-patch32

Endpoints: POST /v1/chat/completions (streamed as server-sent events with `"stream": true`), GET /v1/models,
GET /v1/models/{id}, GET /health. Any OpenAI client works with base_url=http://127.0.0.1:8998/v1.

Messages: `content` is a string or a list of `{"type": "text"}` and `{"type": "image_url"}` parts. An image is
a `data:image/...;base64,` URI, or a local path, accepted only under --image_dir (remote URLs are never
fetched). A conversation may hold several images (up to 8, fewer when the model's context cannot hold
their 50-token spans: inference.chat.VLMChat.max_images; more are refused with a 400), in one message or spread
over user messages; their placeholders lead the earliest user turn kept in the prompt, in the order they were
sent. Earlier user/assistant messages become the history; system messages are ignored (the model was not trained
with them). Sampling: temperature, top_p, max_tokens (or max_completion_tokens),
seed, and the extensions top_k and repetition_penalty; unset fields use inference.chat.GenerationSettings (for a
minimind-3v checkpoint, 3v's own sampling: temperature 0.7, top_k 50, top_p 0.85; its images take 64-token runs of
<|image_pad|>, and a transparent image loses its alpha channel as upstream's does, where v1 puts it over white).

Concurrent requests are decoded together: a dynamic batcher (inference/batcher.py) takes up to --max_batch
waiting requests, waiting at most --batch_wait_ms for a batch to fill, and runs one forward per step for all of
them (left padding with an attention mask; each request keeps its own sampling settings and seed). The model
runs on the batcher's thread, so the server keeps answering (/health, new requests) while it generates. It
binds 127.0.0.1 unless told otherwise.

On a CPU the decoder runs on an fp32 kernel path kept only when measured faster than default at start-up
(--cpu_kernel auto, the same greedy answers as default); --cpu_kernel compiled compiles the decode step at start-up,
for a long-running server (docs/cpu_inference.md); --quantize int8 makes the decoder's linears int8 (faster;
answers may differ from fp32 where two tokens nearly tie, and, since int8 quantises a layer's activations over the
whole batch, a batched answer can then differ from the answer alone too: --max_batch 1 avoids that). The start-up
line after "serving ..." says which.

This file parses the flags and starts uvicorn; the app is inference/openai_app.py, and the reading of requests
inference/openai_request.py.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import os
import sys
from pathlib import Path
from typing import Optional

from runtime.packages import missing_packages

# before the app's imports, which need them: after `make demo` alone they are not installed
MISSING = missing_packages(["fastapi", "uvicorn"], "the API server")
if __name__ == "__main__" and MISSING:
    sys.exit(f"serve_openai_api.py: error: {MISSING}")

from inference.chat import V3_ANSWER_DEFAULTS, GenerationSettings, VLMChat  # noqa: E402
from inference.openai_app import (DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS_LIMIT, Runner,
                                  create_app)  # noqa: E402
from inference.cpu.prepare import add_cpu_inference_args  # noqa: E402
from model.vision import DEFAULT_CLIP_PATH  # noqa: E402
from checkpoints.vision_pairing import add_encoder_mismatch_arg  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model checkpoint (.pth, .safetensors or a model directory)")
    p.add_argument("--clip_path", default=DEFAULT_CLIP_PATH, help="Hugging Face CLIP directory")
    p.add_argument("--tokenizer_path", default=None, help="default: the checkpoint's own tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--image_dir", default=None, help="allow image_url paths under this directory (default: none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_body_mb", type=float, default=10.0, help="largest accepted request body, in MiB")
    p.add_argument("--max_tokens_limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests admitted at once (decoding, queued or generating); more get 503 + Retry-After")
    p.add_argument("--body_timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds a request body may take to arrive (408 after that)")
    p.add_argument("--max_batch", type=int, default=8,
                   help="most requests decoded together in one batch (1: one at a time)")
    p.add_argument("--batch_wait_ms", type=float, default=10.0,
                   help="how long the first waiting request waits for others to join its batch")
    p.add_argument("--model_name", default=None, help="model id reported by the API (default: checkpoint name)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_cpu_inference_args(p)
    add_encoder_mismatch_arg(p)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.image_dir is not None and not os.path.isdir(args.image_dir):
        print(f"serve_openai_api.py: error: --image_dir {args.image_dir} is not a directory", file=sys.stderr)
        return 1
    try:
        chat = VLMChat.load(args.ckpt, args.clip_path, args.tokenizer_path, device=args.device,
                            quantize=args.quantize, cpu_kernel=args.cpu_kernel,
                            allow_encoder_mismatch=args.allow_encoder_mismatch)
    except (OSError, ValueError) as e:  # missing/corrupt checkpoint, CLIP or tokenizer, int8 on a GPU: one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"serve_openai_api.py: error: {message}", file=sys.stderr)
        return 1
    import uvicorn

    model_id = args.model_name or Path(args.ckpt).stem
    if args.max_batch < 1 or args.batch_wait_ms < 0:
        print("serve_openai_api.py: error: --max_batch must be at least 1 and --batch_wait_ms at least 0",
              file=sys.stderr)
        return 1
    runner = Runner(chat, args.max_queue, args.max_batch, args.batch_wait_ms)
    defaults = GenerationSettings()
    if chat.generation == "3v":  # 3v's own sampling (its eval's), as 3-eval_chat.py uses
        defaults = replace(defaults, **{k: v for k, v in V3_ANSWER_DEFAULTS.items() if k != "prompt"})
    app = create_app(runner, model_id, args.image_dir, int(args.max_body_mb * (1 << 20)), defaults=defaults,
                     max_tokens_limit=args.max_tokens_limit, body_timeout_s=args.body_timeout)
    print(f"serving {model_id} ({chat.n_params / 1e6:.2f}M parameters) at http://{args.host}:{args.port}/v1\n"
          f"{chat.kernel_line}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
