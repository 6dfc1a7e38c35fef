"""The training flags are declared once (RunConfig's fields): the parser, the resolved config and the reference
table in docs/training.md cannot drift apart."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from trainer.config import (MODEL_SIZE_FLAGS, PRETRAIN, SFT, ConfigError, RunConfig, add_model_size_args,
                            build_parser)
from trainer.flags import add_flags, flag, flag_default, flag_fields

ROOT = Path(__file__).resolve().parents[1]


def load_flags_table():
    spec = importlib.util.spec_from_file_location("flags_table", ROOT / "scripts" / "flags_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


@pytest.mark.parametrize("stage", [PRETRAIN, SFT], ids=["pretrain", "sft"])
def test_every_field_is_a_flag_and_every_flag_a_field_with_the_same_default(stage):
    fields = flag_fields(RunConfig)
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(RunConfig)]  # no field without a flag
    parser = build_parser(stage)
    actions = options(parser)
    assert list(actions) == [f.name for f in fields]  # no flag without a field, in declaration order
    defaults = vars(parser.parse_args([]))
    for f in fields:
        assert defaults[f.name] == flag_default(f, stage), f.name
        assert actions[f.name].option_strings[0] == f"--{f.name}"
    RunConfig.from_args(parser.parse_args([]))  # the defaults resolve


def test_per_stage_defaults_and_v1_spellings():
    pretrain, sft = (vars(build_parser(s).parse_args([])) for s in (PRETRAIN, SFT))
    assert (pretrain["learning_rate"], sft["learning_rate"]) == (4e-4, 1e-6)
    assert (pretrain["log_interval"], sft["log_interval"]) == (10, 100)
    assert (pretrain["image_prefix"], sft["image_prefix"]) == ("", "COCO_train2014_")
    assert pretrain["data_path"] != sft["data_path"] and pretrain["images_path"] != sft["images_path"]
    assert "_vlm_pretrain.pth" in options(build_parser(SFT))["init"].help
    # v1's command lines (and torch.distributed.launch's --local-rank) still parse
    args = build_parser(SFT).parse_args(["--ddp", "--local_rank", "1", "--epochs", "2", "--use_wandb"])
    assert (args.ddp, args.local_rank, args.epochs, args.use_wandb) == (True, 1, 2, True)
    assert build_parser(SFT).parse_args(["--local-rank=3"]).local_rank == 3
    with pytest.raises(SystemExit):
        build_parser(SFT).parse_args(["--freeze_llm", "4"])  # choices come from the declaration


def test_minimums_are_declared_on_the_fields():
    bounded = {f.name: f.metadata["minimum"] for f in flag_fields(RunConfig) if f.metadata["minimum"] is not None}
    assert bounded == {"epochs": 1, "batch_size": 1, "accumulation_steps": 1, "log_interval": 1, "save_interval": 1,
                       "pack_same_image": 1, "max_seq_len": 1, "num_workers": 0, "eval_interval": 0,
                       "val_samples": 0, "max_steps": 1}
    for name, minimum in bounded.items():
        with pytest.raises(ConfigError, match=f"--{name} must be at least {minimum}"):
            RunConfig.from_args(build_parser(PRETRAIN).parse_args([f"--{name}", str(minimum - 1)]))


def test_model_size_flags_are_the_same_declaration():
    parser = argparse.ArgumentParser()
    add_model_size_args(parser, default_preset="minimind-v")
    ours = options(parser)
    assert list(ours) == list(MODEL_SIZE_FLAGS)
    trainer = options(build_parser(PRETRAIN))
    for name in MODEL_SIZE_FLAGS:
        assert (ours[name].help, ours[name].type, ours[name].choices) == \
            (trainer[name].help, trainer[name].type, trainer[name].choices)
    assert ours["preset"].default == "minimind-v" and trainer["preset"].default == "minimind-v-small"


def test_adding_a_field_adds_its_flag():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended(RunConfig):
        buckets: int = flag(lambda stage: 4 if stage is SFT else 2, "rows per bucket", minimum=1)

    parser = argparse.ArgumentParser()
    add_flags(parser, Extended, SFT)
    assert parser.parse_args([]).buckets == 4 and parser.parse_args(["--buckets", "7"]).buckets == 7


def test_docs_flags_table_is_generated_from_the_declaration():
    table = load_flags_table()
    text = table.flags_table()
    for f in flag_fields(RunConfig):
        assert f"`--{f.name}`" in text
    doc = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert table.table_in(doc) == text, "docs/training.md is stale: run python scripts/flags_table.py --write"


def test_flags_table_writer_replaces_only_its_section():
    table = load_flags_table()
    doc = "# Training\n\nIntro.\n"
    once = table.with_table(doc, "| a |\n")
    assert once.startswith(doc) and "## Flags" in once and table.table_in(once) == "| a |\n"
    twice = table.with_table(once + "\n## Later\n\nkept\n", "| b |\n")
    assert table.table_in(twice) == "| b |\n" and twice.endswith("## Later\n\nkept\n") and "| a |" not in twice
