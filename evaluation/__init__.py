"""Evaluation: how accurate a checkpoint is (speed benchmarks live in bench/).

  exact_match.py        batched greedy answers and exact match (validation while training shares it)
  held_out.py           exact-match accuracy on held-out questions (3-eval_chat.py --eval_data)
  benchmarks.py         POPE and MMStar: running a checkpoint over a benchmark's questions
  benchmark_data.py     reading a benchmark's published files (parquet, JSON, JSONL)
  benchmark_scoring.py  how POPE and MMStar answers are read and scored
  benchmark_specs.py    what each benchmark is: its files, fields and published revision

Imports the network, the checkpoints, the data pipeline and inference's VLMChat; nothing imports it back except
the trainer's validation (exact_match.py only).
"""
