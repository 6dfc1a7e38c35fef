"""Checkpoints and what they are paired with: reading, writing and strictly loading weights, and the records that
keep a checkpoint with its tokenizer and vision tower.

  checkpoint.py         a checkpoint: read it, build and strictly load its model, save it with its sidecar
  weights.py            weight files read strictly (.pth with weights_only, .safetensors, Hugging Face directories)
  config_inference.py   the config read off a checkpoint's shapes, and bounds for every field
  files.py              error types, strict JSON-object reading, atomic writes
  tokenizer.py          tokenizer loading, fingerprints, the chat template and the image placeholder ids
  tokenizer_pairing.py  which tokenizer goes with a checkpoint or a training run
  vision_pairing.py     which vision tower goes with a checkpoint; the untrained stand-in tower

Imports only the network (model/).
"""
