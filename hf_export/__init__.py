"""The Hugging Face export: the transformers wrappers shipped inside an exported directory.

  hf_model.py               MiniMindVLMForCausalLM: the native network behind transformers' interface
  processing_minimind_v.py  MiniMindVProcessor: chat template, image placeholder and pixel preprocessing

Both import only the network (model/). export_model.py copies them, with the network's files, into the export,
rewriting `from model.X` to the flat folder's `from .X`; nothing of the CPU inference engine is shipped.
"""
