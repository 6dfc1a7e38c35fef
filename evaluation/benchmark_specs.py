"""What the standard benchmarks are: where their parquet files live on the Hugging Face Hub (pinned to a
commit), which columns a row has, and the prompt each question is asked with.

This module imports nothing heavy, so that scripts/download.py can read the same pins without loading torch.

Sources (looked up for this module; the Hub pages and task files named here are where to check them):

* POPE, `lmms-lab/POPE` (a dataset repo). Commit 4db1276663dfa5eb8ad16a52d24c31a09e470896 is the head of main
  ("Upload dataset", 6 commits;
  https://huggingface.co/datasets/lmms-lab/POPE/tree/4db1276663dfa5eb8ad16a52d24c31a09e470896).
  Its default config, split `test`, is data/test-0000{0,1,2}-of-00003.parquet (85 MB each, 9,000 rows: 3,000 in
  each of the adversarial, popular and random splits, told apart by the `category` column). Columns, as lmms-eval
  and the dataset's loaders read them: id, question_id, question, answer ("yes"/"no"), image_source, image (a
  Hugging Face Image: a struct of `bytes` and `path`), category.
  Prompt: lmms-eval's default for POPE (lmms_eval/tasks/pope/pope.yaml, post_prompt), the question followed by
  "\\nAnswer the question using a single word or phrase.". Metrics as the original POPE evaluation
  (RUCAIBox/POPE evaluate.py): "yes" is the positive class; accuracy, precision, recall, F1 and the share of "yes"
  answers.
* MMStar, `Lin-Chen/MMStar` (a dataset repo). Commit bc98d668301da7b14f648724866e57302778ab27 is the head of main
  ("Merge branch 'main'", 7 commits;
  https://huggingface.co/datasets/Lin-Chen/MMStar/tree/bc98d668301da7b14f648724866e57302778ab27).
  The file is mmstar.parquet (41.8 MB, split `val`, 1,500 rows, 250 in each of 6 categories). Columns from the
  dataset card: index (int64), question (string, the options written into it as "Options: A: ..., B: ..., ..."),
  image (a Hugging Face Image), answer (string, a letter A-D), category (string), l2_category (string), meta_info
  (a struct of source, split, image_path).
  Prompt: lmms-eval's default for MMStar (lmms_eval/tasks/mmstar/_default_template_yaml, post_prompt), the
  question followed by "\\nAnswer with the option's letter from the given choices directly" (no final period in
  that file). Metric: accuracy overall and per category; chance is 25%.
"""
from __future__ import annotations

from dataclasses import dataclass

# Written beside the downloaded files by scripts/download.py; the evaluation reads the revision back from it.
MANIFEST_NAME = "bench_source.json"
BENCH_DIR = "dataset/bench"


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: its Hub files, the columns a row needs, and how a question is asked."""

    name: str
    repo: str
    revision: str
    files: tuple[str, ...]
    text_columns: tuple[str, ...]  # required, each a string column
    image_column: str
    optional_columns: tuple[str, ...]
    id_columns: tuple[str, ...]  # the first present one names a row in messages
    prompt_suffix: str
    prompt_source: str
    max_new_tokens: int  # enough for the answer the prompt asks for; generation stops at </s> before that
    chance: str
    drop_phrase: str = ""  # removed from the question before the suffix is added, as the source does

    @property
    def default_path(self) -> str:
        return f"{BENCH_DIR}/{self.name}"

    def prompt(self, question: str) -> str:
        question = question.strip()
        if self.drop_phrase:
            question = question.replace(self.drop_phrase, "")
        return question + self.prompt_suffix


POPE = BenchmarkSpec(
    name="pope",
    repo="lmms-lab/POPE",
    revision="4db1276663dfa5eb8ad16a52d24c31a09e470896",
    files=("data/test-00000-of-00003.parquet", "data/test-00001-of-00003.parquet",
           "data/test-00002-of-00003.parquet"),
    text_columns=("question", "answer", "category"),
    image_column="image",
    optional_columns=("question_id", "id", "image_source"),
    id_columns=("question_id", "id"),
    prompt_suffix="\nAnswer the question using a single word or phrase.",
    prompt_source="lmms-eval lmms_eval/tasks/pope/pope.yaml (post_prompt)",
    max_new_tokens=8,
    chance="0.5 accuracy (each split is half yes, half no); F1 0.667 by always answering yes",
)

MMSTAR = BenchmarkSpec(
    name="mmstar",
    repo="Lin-Chen/MMStar",
    revision="bc98d668301da7b14f648724866e57302778ab27",
    files=("mmstar.parquet",),
    text_columns=("question", "answer", "category"),
    image_column="image",
    optional_columns=("l2_category", "index"),
    id_columns=("index",),
    prompt_suffix="\nAnswer with the option's letter from the given choices directly",
    prompt_source="lmms-eval lmms_eval/tasks/mmstar/_default_template_yaml (post_prompt)",
    max_new_tokens=32,  # room for an answer that repeats the option's text instead of its letter
    chance="0.25 accuracy (four options)",
    drop_phrase=" Please answer yes or no.",  # lmms-eval's mmstar_doc_to_text drops it before adding its suffix
)

BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (POPE, MMSTAR)}
