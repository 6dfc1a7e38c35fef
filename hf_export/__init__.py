"""The Hugging Face export: the transformers wrappers shipped inside an exported directory, and the conversion.

Shipped inside every export (copied flat beside the network's files, `from model.X` rewritten to `from .X`):
  hf_model.py               MiniMindVLMForCausalLM: the native network behind transformers' interface
  processing_minimind_v.py  MiniMindVProcessor: chat template, image placeholder and pixel preprocessing
These two import the network (model/) only, nothing else of the project: an export must load without this
repository. files.copy_model_code refuses to ship a file that imports beyond model/.

Not shipped (the conversion itself, run from export_model.py; it reads checkpoints, so it imports checkpoints/):
  export.py      checkpoint -> export directory (and back: import_hf), with the logits check
  files.py       which code ships; the output folder's checks, staging and move
  model_card.py  the README.md of an export, and the upload to the Hugging Face Hub
"""
