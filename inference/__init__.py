"""Inference: what 3-eval_chat.py, web_server.py and serve_openai_api.py are built on.

  chat.py             VLMChat: load a checkpoint, encode images, build prompts (images capped by the context),
                      stream answers
  batcher.py          the dynamic batcher that decodes concurrent requests together
  console.py          3-eval_chat.py's answering job: which checkpoint, loading it, questions about image files
  model_files.py      the checkpoints the apps offer (model directories, the newest SFT checkpoint)
  openai_app.py, openai_request.py   the OpenAI-compatible API server
  web_support.py, web_inspect.py     the web demo's logic and its "inside the model" panel
  attention_map.py, attention_plot.py  where an answer looked: attention maps and their pictures
  app_images.py       images as the apps decode them: v1 puts transparency over white, 3v drops the alpha channel
  cpu/                fast CPU inference: kernels chosen by measurement, the compiled decode step, int8

Imports the network (model/) and reads data files through data_pipeline/, never the trainer.
"""
