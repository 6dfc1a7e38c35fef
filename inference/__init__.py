"""Inference: what 3-eval_chat.py, web_server.py and serve_openai_api.py are built on.

  chat.py           VLMChat: load a checkpoint, encode images, build prompts, stream answers
  batcher.py        the dynamic batcher that decodes concurrent requests together
  evaluate.py       exact-match accuracy on held-out questions
  attention_map.py, attention_plot.py, web_inspect.py   where an answer looked: attention maps and their pictures

Imports the network (model/) and reads data files through data_pipeline/, never the trainer.
"""
