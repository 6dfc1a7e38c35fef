"""--compile: the training step compiles whole (no graph break, forward and backward), a bounded number of times
over an epoch of varied lengths, and gives eager's loss and gradients.

Graph breaks and compile counts are properties of the capture (dynamo), the same whatever backend builds the
kernels, so most tests use the aot_eager backend (forward and backward captured, no C++ build); one compares
inductor's numbers with eager's."""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import tiny_config
from helpers import make_dataset, run_stage, train_argv
from data_pipeline.dataset import Batch, collate
from data_pipeline.tokens import IGNORE_INDEX
from model.config import IMAGE_TOKENS
from model.vlm import MiniMindVLM
from trainer.compile_step import CompileCounts, compiler_problem
from trainer.config import PRETRAIN
from trainer.step import StepContext, _model_inputs, new_train_state, train_step


def _row(tokenizer, n_text: int, image: bool, seed: int) -> dict:
    """A dataset item: (the placeholder span after 3 ids when image) then text, the last 4 ids supervised."""
    g = torch.Generator().manual_seed(seed)
    image_ids = tiny_config(tokenizer).image_ids
    ids = torch.randint(100, 6000, (n_text,), generator=g).tolist()
    starts = []
    if image:
        ids = ids[:3] + list(image_ids) + ids[3:]
        starts = [3]
    labels = [IGNORE_INDEX] * (len(ids) - 4) + ids[-4:]
    item = {"id": f"r{seed}", "input_ids": ids, "labels": labels, "image_starts": starts,
            "features": [torch.randn(IMAGE_TOKENS, 64, generator=g)] if image else []}
    return item


def _batches(tokenizer) -> list[Batch]:
    """An epoch of varied lengths: image rows, text-only rows beside them, padding, a short last batch."""
    lengths = [(20, 14, 30), (9, 25, 17), (40, 11, 12), (7, 33)]
    return [collate([_row(tokenizer, n, image=(i + j) % 3 != 2, seed=10 * i + j) for j, n in enumerate(group)])
            for i, group in enumerate(lengths)]


def _model(tokenizer) -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config(tokenizer, dropout=0.0)).train()


def _loss(model, batch: Batch, compiled: bool) -> torch.Tensor:
    inputs = _model_inputs(batch, batch.features, torch.device("cpu"))
    if compiled:
        from trainer.compile_step import mark_dynamic_dims

        mark_dynamic_dims(inputs)
    return model(**inputs).loss


def test_the_forward_of_a_training_step_has_no_graph_break(tokenizer):
    model, batch = _model(tokenizer), _batches(tokenizer)[0]
    assert batch.image_rows is not None and batch.loss_positions is not None
    inputs = _model_inputs(batch, batch.features, torch.device("cpu"))
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_without_the_positions_the_forward_breaks_at_the_span_search(tokenizer):
    """The check can fail: the plain forward (span search, supervised mask) syncs with the host and breaks."""
    model, batch = _model(tokenizer), _batches(tokenizer)[0]
    explained = torch._dynamo.explain(model)(batch.input_ids, batch.features, labels=batch.labels, loss_only=True)
    assert explained.graph_break_count > 0


def test_forward_and_backward_compile_whole_and_a_bounded_number_of_times(tokenizer):
    torch._dynamo.reset()
    counters.clear()
    model = _model(tokenizer)
    compiled = torch.compile(model, backend="aot_eager")
    ctx = StepContext(encoder=None, device=torch.device("cpu"), autocast=contextlib.nullcontext, compiled=True)
    state = new_train_state(model, torch.device("cpu"), torch.float32)
    start = CompileCounts.now()
    for epoch in range(2):
        for batch in _batches(tokenizer):
            metrics = train_step(compiled, [batch], state, 1e-3, ctx)
            assert not metrics.non_finite
    done = CompileCounts.now().since(start)
    assert done.graph_breaks == 0, done.break_reasons
    # 4 lengths, 3 or 2 rows, 1 to 3 images, varied supervised counts, two epochs: marked dynamic, one graph
    assert done.graphs <= 2, done
    assert counters["aot_autograd"]["total"] == done.graphs  # each captured with its backward


def test_eager_loss_and_gradients_are_unchanged_by_the_batch_positions(tokenizer):
    """The forward given the collate step's spans and supervised positions computes exactly what it computes
    when it searches for them (eager numerics are kept)."""
    model = _model(tokenizer)
    for batch in _batches(tokenizer):
        found = model(batch.input_ids, batch.features, labels=batch.labels, loss_only=True).loss
        found.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        given = _loss(model, batch, compiled=False)
        given.backward()
        assert torch.equal(found, given)
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
        model.zero_grad()


def test_a_cut_short_span_is_refused_by_the_data_pipeline(tokenizer, tmp_path):
    from data_pipeline.dataset import VLMDataset
    from data_pipeline.records import DataError

    data, images = make_dataset(tmp_path, n_images=2)
    dataset = VLMDataset(str(data), str(images), tokenizer, 96)
    sample = dataset.samples[0]
    start = dataset[0]["image_starts"][0]
    dataset.samples[0] = dataclasses.replace(sample, input_ids=sample.input_ids[:start + 30])
    with pytest.raises(DataError, match="cut short"):
        dataset[0]


@pytest.mark.skipif(compiler_problem() is not None, reason="inductor needs a working C++ compiler")
def test_inductor_loss_and_gradients_equal_eagers(tokenizer):
    torch._dynamo.reset()
    eager, batches = _model(tokenizer), _batches(tokenizer)
    compiled_model = _model(tokenizer)
    compiled = torch.compile(compiled_model)
    for batch in batches[:2]:
        for m in (eager, compiled_model):
            m.zero_grad()
        want = _loss(eager, batch, compiled=False)
        want.backward()
        got = _loss(compiled, batch, compiled=True)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_pretrain_with_compile_logs_no_graph_break_and_few_compiles(tmp_path, tiny_clip_dir, monkeypatch, caplog):
    """1-pretrain_vlm.py --compile on tiny data (rows of several lengths, text-only rows among them): the log
    says how many graphs compiled and how many breaks there were (aot_eager here: no C++ build)."""
    import trainer.loop

    def compile_with_aot_eager(model, device):
        return torch.compile(model, backend="aot_eager"), None

    monkeypatch.setattr(trainer.loop, "compile_for_training", compile_with_aot_eager)
    text_only = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "hello " * (i + 1)},
                                                   {"from": "gpt", "value": "hi there " * (i + 1)}]} for i in range(4)]
    data, images = make_dataset(tmp_path, n_images=10, extra_records=text_only)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="minimind"):
        summary = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "out", "--compile",
                                                 "--batch_size", "3"))
    assert summary["graph_breaks"] == 0
    assert 1 <= summary["compiled_graphs"] <= 4
    assert any("graph(s) compiled, 0 graph break(s)" in r.getMessage() for r in caplog.records)


def test_packed_rows_compile_whole_and_unpacked_batches_share_their_graph(tokenizer):
    """--pack_same_image under --compile: segment ids on every batch (unpacked rows all 0), so a batch without
    a packed row runs the packed batches' graph, and the packed attention layout has no graph break."""
    torch._dynamo.reset()
    model = _model(tokenizer)
    compiled = torch.compile(model, backend="aot_eager")
    packed = _row(tokenizer, 30, image=True, seed=1)
    prefix = 3 + IMAGE_TOKENS + 5
    packed["segment_ids"] = [0] * prefix + [1] * 10 + [2] * (len(packed["input_ids"]) - prefix - 10)
    batches = [collate([packed, _row(tokenizer, 12, image=True, seed=2)], segments=True),
               collate([_row(tokenizer, n, image=True, seed=n) for n in (9, 21, 15)], segments=True)]
    assert batches[1].segment_ids is not None and int(batches[1].segment_ids.max()) == 0
    explained = torch._dynamo.explain(model)(**_model_inputs(batches[0], batches[0].features, torch.device("cpu")))
    assert explained.graph_break_count == 0, explained.break_reasons
    start = CompileCounts.now()
    for batch in batches:
        _loss(compiled, batch, compiled=True).backward()
    done = CompileCounts.now().since(start)
    assert done.graph_breaks == 0 and done.graphs == 1, done
    # an unpacked row given segment ids trains exactly as without them (same loss, eager)
    plain = collate([_row(tokenizer, n, image=True, seed=n) for n in (9, 21, 15)])
    torch.testing.assert_close(_loss(model, batches[1], compiled=False), _loss(model, plain, compiled=False))


def test_without_a_working_cpp_compiler_the_model_stays_eager_with_the_reason(tokenizer, monkeypatch, tmp_path):
    from trainer.compile_step import compile_for_training

    model = _model(tokenizer)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    same, why = compile_for_training(model, torch.device("cpu"))
    assert same is model and "no C++ compiler (no-such-compiler-here)" in why and "\n" not in why
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'cc1plus: fatal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    same, why = compile_for_training(model, torch.device("cpu"))
    assert same is model and "fails on a one-line program (cc1plus: fatal error)" in why


def test_pretrain_with_compile_but_no_compiler_trains_eager_and_says_so(tmp_path, tiny_clip_dir, monkeypatch,
                                                                        caplog):
    import trainer.loop

    assert trainer.loop.compile_for_training.__module__ == "trainer.compile_step"  # the real one
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    data, images = make_dataset(tmp_path, n_images=4)
    with caplog.at_level(logging.WARNING, logger="minimind"):
        summary = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "out", "--compile",
                                                 "--max_steps", "1"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--compile:")]
    assert len(lines) == 1 and "training runs eager" in lines[0]
    assert summary["step"] == 1 and summary["compiled_graphs"] == 0


# ---------------------------------------------------------------------------------------------- minimind-3v
def _v3_model_and_inputs(marker: int = 12):
    """A tiny 3v model and a batch of two rows: one whole 64-token run in row 0, a run cut short by the end of
    row 1 (as max_seq_len cuts it), padding after row 0; the run starts as the collate step passes them."""
    from model.config import LMConfig

    torch.manual_seed(0)
    config = LMConfig.for_generation("3v", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vision_dim=32,
                                     vocab_size=400, image_ids=[marker], dropout=0.0)
    model = MiniMindVLM(config).train()
    n = config.image_tokens
    row0 = [5, 6] + [marker] * n + [7, 8, 9]
    row1 = [5, 6, 7, 8] + [marker] * 20
    ids = torch.zeros(2, len(row0), dtype=torch.long)
    ids[0], ids[1, :len(row1)] = torch.tensor(row0), torch.tensor(row1)
    labels = ids.masked_fill(ids == marker, IGNORE_INDEX)
    features = torch.randn(2, n, 32)
    spans = (torch.tensor([0, 1]), torch.tensor([2, 4]))
    loss_positions = (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().squeeze(1)
    return model, dict(input_ids=ids, image_features=features, labels=labels, loss_only=True,
                       image_spans=spans, loss_positions=loss_positions)


def test_a_3v_splice_from_known_run_starts_equals_the_searched_one():
    model, inputs = _v3_model_and_inputs()
    h = model.embed(inputs["input_ids"])
    known = model.splice_images(h, inputs["input_ids"], inputs["image_features"], inputs["image_spans"])
    searched = model.splice_images(h, inputs["input_ids"], inputs["image_features"])
    assert torch.equal(known, searched)
    assert not torch.equal(known, h)  # the runs were written


def test_a_3v_training_forward_has_no_graph_break():
    model, inputs = _v3_model_and_inputs()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    without = {k: v for k, v in inputs.items() if k not in ("image_spans", "loss_positions")}
    assert torch._dynamo.explain(model)(**without).graph_break_count > 0  # the run search syncs with the host
