"""The data pipeline: records (JSON, JSONL, parquet) -> token ids, labels and images -> batches.

  dataset.py        VLMDataset, the typed Batch and collate, bad-record accounting
  parquet.py        parquet rows in the current MiniMind-V layout, read one row group at a time
  feature_store.py  the frozen-CLIP feature cache and batch_features (a batch's images -> features)
  samplers.py       the shuffled and the length-grouped orders, both resumable mid-epoch

Imports only the network (model/). The user's data files live in dataset/, which holds no code.
"""
