"""The network and its files.

  config.py             LMConfig and the two published sizes (PRESETS)
  decoder.py            the MiniMind text decoder: RMSNorm, RoPE, the KV cache, attention_layout (which keys
                        each query sees, at which positions), GQA attention, blocks, loss
  feed_forward.py       the blocks' feed-forward: SwiGLU and its mixture-of-experts form
  vlm.py                MiniMindVLM: the projection, the splice of image features into the placeholder span,
                        generation
  vision.py             the frozen CLIP vision tower, image decoding and preprocessing
  tokenizer.py          tokenizer loading, fingerprints, the resolution rule, the chat template and the image
                        placeholder ids
  files.py              the checkpoint error types, strict JSON-object reading, atomic writes
  weights.py            reading weight files strictly: .pth (weights_only), .safetensors, Hugging Face directories
  config_inference.py   the config read off a checkpoint's shapes, and the bounds every config field is checked in
  checkpoint.py         a checkpoint: read it (with its config sidecar), build and strictly load its model, save it
  tokenizer_pairing.py  which tokenizer goes with a checkpoint or a training run
  scoring.py            greedy exact-match scoring (validation while training, evaluation)
  seed.py               one seed for every random number generator
  hf_model.py, processing_minimind_v.py   the transformers wrappers shipped with an export

Nothing here imports the data pipeline, the trainer or the inference code (tests/test_layout.py checks it).
"""
