"""--pack_same_image: several questions about one image share its tokens in one row and train exactly as alone."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from helpers import make_dataset, run_stage, train_argv

from data_pipeline.dataset import VLMDataset, collate
from model.decoder import attention_layout
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM
from trainer.config import SFT

QUESTIONS = [("What colour is it?", "red"), ("Is it red?", "yes"), ("Is there a blue square in the picture?", "no"),
             ("Name the colour.", "red")]


def qa_records(image: str, prefix: str, questions=QUESTIONS) -> list[dict]:
    return [{"id": f"{prefix}{i}", "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]} for i, (q, a) in enumerate(questions)]


@torch.no_grad()
def assert_packed_trains_as_alone(model: MiniMindVLM, encoder, alone: VLMDataset, packed: VLMDataset) -> None:
    """The logits at every supervised position and the loss of the packed rows equal those of the rows alone: the
    same targets in the same order (row-major: questions keep their order inside a row)."""
    def supervised_logits(dataset: VLMDataset) -> tuple[torch.Tensor, float]:
        batch = collate([dataset[i] for i in range(len(dataset))])
        features = encoder.encode_pixels(batch.pixels)
        out = model(batch.input_ids, features, labels=batch.labels, loss_only=True, segment_ids=batch.segment_ids)
        return out.logits, float(out.loss)

    (logits_alone, loss_alone), (logits_packed, loss_packed) = supervised_logits(alone), supervised_logits(packed)
    assert logits_packed.shape == logits_alone.shape
    assert torch.allclose(logits_packed, logits_alone, atol=1e-4), (logits_packed - logits_alone).abs().max()
    assert abs(loss_packed - loss_alone) < 1e-5


def test_packed_layout_positions_and_mask():
    #                 prefix   | seg 1 | seg 2   | pad
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1]])
    with pytest.raises(ValueError, match="segment_ids"):  # packed rows carry their own mask
        attention_layout(9, 1, seg.device, torch.ones(1, 9), segment_ids=seg)
    positions, mask = attention_layout(9, 1, seg.device, segment_ids=seg)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 8]]
    m = mask[0, 0]
    assert m[4].tolist() == [True, True, True, True, True, False, False, False, False]  # seg 1: prefix + itself
    assert m[6].tolist() == [True, True, True, False, False, True, True, False, False]  # seg 2 skips seg 1
    assert m[2].tolist() == [True, True, True] + [False] * 6  # the prefix is plain causal
    assert m[8, 8]  # a padded query sees itself: no empty row


@pytest.mark.parametrize("model_len", [200, 48])  # 48: rows outgrow the model's RoPE table, which then grows
def test_packed_row_trains_exactly_like_the_questions_alone(tmp_path, tokenizer, tiny_clip_dir, model_len):
    """Logits at every supervised position and the loss of a packed batch equal those of the rows one by one."""
    data, images = make_dataset(tmp_path, n_images=2)
    records = qa_records("img_0.png", "a") + qa_records("img_1.png", "b", QUESTIONS[:2])
    data.write_text(json.dumps(records))
    encoder = load_vision_encoder(str(tiny_clip_dir))
    alone = VLMDataset(str(data), str(images), tokenizer, 200, preprocess=encoder.preprocess)
    packed = VLMDataset(str(data), str(images), tokenizer, 200, preprocess=encoder.preprocess, pack_same_image=3)
    assert len(alone) == 6 and len(packed) == 3  # 3 + 1 questions on img_0, 2 on img_1
    assert [s.segment_ids is not None for s in packed.samples] == [True, False, True]
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer, max_seq_len=model_len)).eval()

    assert_packed_trains_as_alone(model, encoder, alone, packed)


def test_packing_keeps_apart_what_cannot_share(tmp_path, tokenizer, tiny_clip_dir):
    """Different images, text-only records and rows that would pass max_seq_len stay rows of their own."""
    data, images = make_dataset(tmp_path, n_images=2)
    text_only = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."},
                                                    {"from": "gpt", "value": "hi"}]} for i in range(2)]
    data.write_text(json.dumps(qa_records("img_0.png", "a", QUESTIONS[:2]) + qa_records("img_1.png", "b", QUESTIONS[:1])
                               + text_only))
    ds = VLMDataset(str(data), str(images), tokenizer, 200, pack_same_image=4)
    assert [s.id for s in ds.samples] == ["a0(+1)", "b0", "t0", "t1"]
    one_fits = len(VLMDataset(str(data), str(images), tokenizer, 200).samples[0].input_ids) + 5
    tight = VLMDataset(str(data), str(images), tokenizer, one_fits, pack_same_image=4)
    assert len(tight) == 5


def test_training_with_packing_runs_and_resumes_exactly(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, n_images=2)
    data.write_text(json.dumps(qa_records("img_0.png", "a") + qa_records("img_1.png", "b")))
    argv = train_argv(data, images, tiny_clip_dir, tmp_path / "o", "--max_seq_len", "200", "--batch_size", "1",
                      "--pack_same_image", "2", "--epochs", "1", "--image_prefix", "")
    full = run_stage(SFT, argv)
    assert full["step"] == 4 and full["skipped_records"] == 0  # 8 questions in 4 rows
    first = run_stage(SFT, argv + ["--out_dir", str(tmp_path / "r"), "--max_steps", "2"])
    second = run_stage(SFT, argv + ["--out_dir", str(tmp_path / "r"), "--resume"])
    assert first["losses"] + second["losses"] == full["losses"]


def test_packed_3v_rows_train_exactly_like_the_questions_alone(tmp_path):
    """minimind-3v packs too: its 64-token `<|image_pad|>` run is the shared prefix, and the logits at every
    supervised position and the loss equal those of the rows one by one."""
    from checkpoints.tokenizer import PROJECT_V3_TOKENIZER_PATH, image_pad_id, load_tokenizer
    from conftest import ROOT
    from model.config import LMConfig

    tokenizer = load_tokenizer(str(ROOT / PROJECT_V3_TOKENIZER_PATH))
    encoder = load_vision_encoder(str(ROOT / "tests" / "fixtures" / "v3_parity" / "vision"))
    data, images = make_dataset(tmp_path, n_images=2)
    data.write_text(json.dumps(qa_records("img_0.png", "a") + qa_records("img_1.png", "b", QUESTIONS[:2])))

    def dataset(pack: int) -> VLMDataset:
        return VLMDataset(str(data), str(images), tokenizer, 400, preprocess=encoder.preprocess,
                          pack_same_image=pack, generation="3v")

    alone, packed = dataset(1), dataset(3)
    assert len(alone) == 6 and len(packed) == 3
    assert [s.segment_ids is not None for s in packed.samples] == [True, False, True]
    assert sum(len(s.input_ids) for s in packed.samples) < sum(len(s.input_ids) for s in alone.samples) - 3 * 64
    torch.manual_seed(0)
    model = MiniMindVLM(LMConfig.for_generation("3v", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                vision_dim=encoder.hidden_size, image_ids=image_pad_id(tokenizer),
                                                max_seq_len=400)).eval()

    assert_packed_trains_as_alone(model, encoder, alone, packed)
