"""The network and its files.

  config.py              LMConfig and the two published sizes (PRESETS)
  decoder.py             the MiniMind text decoder: RMSNorm, RoPE, the attention layout (positions and masks), GQA
                         attention, blocks, loss
  feed_forward.py        SwiGLU and its mixture-of-experts form
  vlm.py                 MiniMindVLM: the projection, the splice of image features into the placeholder span, generation
  vision.py              the frozen CLIP vision tower, image decoding and preprocessing
  tokenizer.py           tokenizer loading, fingerprints, the chat template and the image placeholder ids
  tokenizer_pairing.py   which tokenizer goes with a checkpoint or a training run
  vision_pairing.py      which vision encoder goes with a checkpoint: its record in the sidecar, the check at load
  checkpoint.py          a checkpoint: read it, build and strictly load its model, save it
  weights.py             reading weight files strictly (.pth with weights_only, .safetensors, Hugging Face directories)
  config_inference.py    the config read off a checkpoint's shapes, and bounds for every field
  files.py               error types, strict JSON-object reading, atomic writes
  scoring.py             batched greedy answers and exact match (validation and evaluation share it)
  seed.py                one seed for every random number generator
  cpu_kernels.py, quantize.py, cpu_inference.py   CPU inference: the kernel path chosen by measurement, int8 weights
  hf_model.py, processing_minimind_v.py            the transformers wrappers shipped with an export

Nothing here imports the data pipeline, the trainer or the inference code (tests/test_layout.py checks it).
"""
