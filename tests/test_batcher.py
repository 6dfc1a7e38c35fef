"""inference.batcher.DynamicBatcher: concurrent requests decoded together give the tokens they give alone."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

from inference.batcher import DecodeRequest, DynamicBatcher
from model.vlm import MiniMindVLM

EOS = 2


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config(tokenizer)).eval()


def _requests(model, **settings):
    gen = torch.Generator().manual_seed(7)
    text = lambda n: torch.randint(100, 6400, (n,), generator=gen).tolist()  # noqa: E731
    span = list(model.config.image_ids)
    feats = torch.randn(2, 1, 50, model.config.vision_dim, generator=gen)
    prompts = [(text(3) + span + text(8), feats[0]), (text(4), None), (text(1) + span + text(2), feats[1]),
               (text(19), None)]
    return [DecodeRequest(p, f, max_new_tokens=n, **settings) for (p, f), n in zip(prompts, (9, 5, 12, 7))]


def _alone(model, request, **kwargs):
    return model.generate(torch.tensor([request.prompt]), request.image_features, eos_token_id=EOS,
                          max_new_tokens=request.max_new_tokens, **kwargs)[0].tolist()


def _assert_one_greedy_batch_matches_row_by_row(model):
    batcher = DynamicBatcher(model, EOS, EOS, max_batch=8, max_wait_s=2.0)
    requests = _requests(model)
    for r in requests:
        batcher.submit(r)
    got = [list(r.tokens()) for r in requests]
    assert batcher.batch_sizes == [4]
    for r, tokens in zip(requests, got):
        assert tokens == _alone(model, r, temperature=0.0)
        assert len(tokens) == r.max_new_tokens  # rows of different lengths left the batch at their own end


def test_concurrent_greedy_requests_form_one_batch_and_match_row_by_row(model):
    _assert_one_greedy_batch_matches_row_by_row(model)


def test_batch_size_cap_and_seeded_sampling(model):
    batcher = DynamicBatcher(model, EOS, EOS, max_batch=3, max_wait_s=2.0)
    requests = _requests(model, temperature=0.9, top_k=20, seed=11, repetition_penalty=1.1)
    for r in requests:
        batcher.submit(r)
    got = [list(r.tokens()) for r in requests]
    assert batcher.batch_sizes == [3] and batcher.joins == 1  # the fourth joined when a row ended
    for r, tokens in zip(requests, got):
        expected = _alone(model, r, temperature=0.9, top_k=20, repetition_penalty=1.1,
                          generator=torch.Generator().manual_seed(11))
        assert tokens == expected


def test_cancelled_request_leaves_the_batch_and_others_finish(model):
    batcher = DynamicBatcher(model, EOS, EOS, max_batch=8, max_wait_s=2.0)
    requests = _requests(model)
    waiting = DecodeRequest(requests[3].prompt, None, 5)
    waiting.cancel.set()  # cancelled before its batch starts: never decoded
    for r in requests + [waiting]:
        batcher.submit(r)
    first = requests[2].tokens()
    next(first)
    requests[2].cancel.set()
    assert len(list(first)) <= 1  # at most the token already decoded when the cancel was seen
    assert list(waiting.tokens()) == []
    assert list(requests[0].tokens()) == _alone(model, requests[0], temperature=0.0)


def test_a_failing_batch_reports_to_its_clients_and_the_batcher_keeps_serving(model):
    batcher = DynamicBatcher(model, EOS, EOS, max_batch=8, max_wait_s=0.0)
    bad = DecodeRequest(_requests(model)[0].prompt, torch.zeros(1, 50, 3), 4)  # wrong feature width
    batcher.submit(bad)
    with pytest.raises(RuntimeError):
        list(bad.tokens())
    good = _requests(model)[1]
    batcher.submit(good)
    assert list(good.tokens()) == _alone(model, good, temperature=0.0)


def test_requests_arriving_mid_batch_join_it_and_match_row_by_row(model):
    batcher = DynamicBatcher(model, EOS, EOS, max_batch=8, max_wait_s=0.0)
    first, *later = _requests(model)
    first.max_new_tokens = 30
    stream = first.tokens()
    batcher.submit(first)
    head = [next(stream), next(stream)]  # the batch is decoding
    for r in later:
        batcher.submit(r)
    got = [list(r.tokens()) for r in later]
    assert head + list(stream) == _alone(model, first, temperature=0.0)
    for r, tokens in zip(later, got):
        assert tokens == _alone(model, r, temperature=0.0)
    assert batcher.joins >= 1 and len(batcher.batch_sizes) < 4


@pytest.mark.parametrize("kernel", ["transposed", "onednn", "auto", "compiled"])
def test_each_cpu_kernel_path_batches_as_it_decodes_alone(model, kernel):
    """The CPU kernels (what --cpu_kernel picks in the API) keep the batcher's guarantee; the compiled decode step
    is the model's own next_token_logits, which the batcher calls."""
    from inference.cpu.compiled import compiler_missing
    from inference.cpu.kernels import current_kernel, unavailable_reason
    from inference.cpu.prepare import prepare_for_cpu_inference

    missing = compiler_missing() if kernel == "compiled" else None if kernel == "auto" else unavailable_reason(kernel)
    if missing:
        pytest.skip(missing)
    converted = copy.deepcopy(model)
    prepare_for_cpu_inference(converted, "none", kernel)
    assert kernel == "auto" or current_kernel(converted) == kernel
    _assert_one_greedy_batch_matches_row_by_row(converted)
