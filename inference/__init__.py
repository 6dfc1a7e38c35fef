"""Inference: what 3-eval_chat.py, web_server.py and serve_openai_api.py are built on.

  chat.py             VLMChat: load a checkpoint, encode images, build prompts (images capped by the context),
                      stream answers
  batcher.py          the dynamic batcher that decodes concurrent requests together
  model_files.py      the checkpoints the apps offer (model directories, the newest SFT checkpoint)
  evaluate.py         exact-match accuracy on held-out questions
  benchmarks.py, bench_data.py, bench_scoring.py, bench_specs.py   POPE and MMStar from their published files
  openai_app.py, openai_request.py   the OpenAI-compatible API server
  web_support.py, web_inspect.py     the web demo's logic and its "inside the model" panel
  attention_map.py, attention_plot.py  where an answer looked: attention maps and their pictures

Imports the network (model/) and reads data files through data_pipeline/, never the trainer.
"""
