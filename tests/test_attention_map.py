"""model/attention_map.py: explicit attention weights against a hand-written reference, on tiny configs."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from inference.attention_map import answer_query_positions, inspect_answer, inspect_attention
from model.config import IMAGE_TOKENS
from model.vlm import MiniMindVLM


def reference_forward(model: MiniMindVLM, ids: torch.Tensor, features: torch.Tensor):
    """The decoder written out by hand, one head at a time: (logits [T, vocab], weights [layers, heads, T, T]).

    Only the feed-forward (dense or MoE) is called as a module; norms, rotary embedding (real form, pairs
    (x0, x1), (x2, x3), ...), GQA head sharing, the causal mask and the softmax are spelled out here."""
    cfg = model.config
    T, hd = ids.shape[0], cfg.head_dim
    h = model.tok_embeddings.weight[ids].clone()
    start = next(i for i in range(T) if ids[i:i + IMAGE_TOKENS].tolist() == cfg.image_ids)
    h[start:start + IMAGE_TOKENS] = features[0] @ model.vision_proj.vision_proj[0].weight.T

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps)

    pair = torch.arange(hd // 2, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] / cfg.rope_theta ** (2 * pair / hd)  # [T, hd/2]
    c, s = angle.cos().float(), angle.sin().float()

    def rotate(x):  # x [T, hd]: pair (x[2i], x[2i+1]) at position t turns by angle[t, i]
        out = torch.empty_like(x)
        out[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
        out[:, 1::2] = x[:, 0::2] * s + x[:, 1::2] * c
        return out

    all_weights = []
    for block in model.layers:
        a = block.attention
        x = rms(h, block.attention_norm.weight)
        q, k, v = x @ a.wq.weight.T, x @ a.wk.weight.T, x @ a.wv.weight.T
        heads, layer_weights = [], []
        for head in range(cfg.n_heads):
            kv = head // (cfg.n_heads // cfg.n_kv_heads)
            qh = rotate(q[:, head * hd:(head + 1) * hd])
            kh = rotate(k[:, kv * hd:(kv + 1) * hd])
            vh = v[:, kv * hd:(kv + 1) * hd]
            scores = (qh @ kh.T) / math.sqrt(hd)
            w = torch.zeros(T, T)
            for t in range(T):  # query t sees keys 0..t
                e = torch.exp(scores[t, :t + 1] - scores[t, :t + 1].max())
                w[t, :t + 1] = e / e.sum()
            layer_weights.append(w)
            heads.append(w @ vh)
        all_weights.append(torch.stack(layer_weights))
        h = h + torch.cat(heads, dim=1) @ a.wo.weight.T
        h = h + block.feed_forward(rms(h, block.ffn_norm.weight)[None])[0]
    logits = rms(h, model.norm.weight) @ model.output.weight.T
    return logits, torch.stack(all_weights)


def sequence(tokenizer, text_before: str = "<s>user\n", text_after: str = "\nwhat shape?</s>\n<s>assistant\n"):
    cfg_ids = tiny_config(tokenizer).image_ids
    ids = tokenizer(text_before)["input_ids"] + cfg_ids + tokenizer(text_after)["input_ids"]
    return torch.tensor(ids)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_weights_and_logits_match_a_hand_written_reference(tokenizer, moe):
    torch.manual_seed(1)
    model = MiniMindVLM(tiny_config(tokenizer, use_moe=moe, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    ids = sequence(tokenizer)
    features = torch.randn(1, IMAGE_TOKENS, 64)
    ref_logits, ref_weights = reference_forward(model, ids, features)
    maps = inspect_attention(model, ids, features)
    assert maps.weights.shape == (2, 4, len(ids), len(ids))
    torch.testing.assert_close(maps.weights, ref_weights, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(maps.logits, ref_logits, atol=2e-4, rtol=1e-4)
    # ... and the inspected logits are the normal (SDPA) forward's
    with torch.no_grad():
        normal = model(ids[None], features).logits[0]
    torch.testing.assert_close(maps.logits, normal, atol=2e-5, rtol=1e-5)
    assert maps.image_start == len(tokenizer("<s>user\n")["input_ids"])


def test_rows_sum_to_one_and_never_look_ahead(tokenizer):
    torch.manual_seed(2)
    model = MiniMindVLM(tiny_config(tokenizer, use_moe=True)).eval()
    ids = sequence(tokenizer)
    queries = [0, 5, 60, len(ids) - 1]
    maps = inspect_attention(model, ids, torch.randn(1, IMAGE_TOKENS, 64), queries)
    assert maps.weights.shape[2] == len(queries)
    for qi, pos in enumerate(queries):
        rows = maps.weights[:, :, qi]
        torch.testing.assert_close(rows[..., :pos + 1].sum(-1), torch.ones(rows.shape[:2]))
        assert not rows[..., pos + 1:].any()  # no weight on future positions
        assert (rows[..., :pos + 1] > 0).all()
    # the first position can only look at itself
    assert torch.equal(maps.weights[:, :, 0, 0], torch.ones(maps.n_layers, 4))


def test_summaries_read_the_image_positions(tokenizer):
    torch.manual_seed(3)
    model = MiniMindVLM(tiny_config(tokenizer)).eval()
    ids = sequence(tokenizer)
    maps = inspect_attention(model, ids, torch.randn(1, IMAGE_TOKENS, 64), [len(ids) - 2, len(ids) - 1])
    start = maps.image_start
    image = maps.weights[..., start:start + IMAGE_TOKENS]
    torch.testing.assert_close(maps.image_weights(), image)
    torch.testing.assert_close(maps.image_share(), image.sum(-1).mean(dim=(1, 2)))
    assert ((maps.image_share() > 0) & (maps.image_share() < 1)).all()
    grid = maps.patch_grid()
    assert grid.shape == (7, 7)
    torch.testing.assert_close(grid.flatten(), image[..., 1:].mean(dim=(0, 1, 2)))
    torch.testing.assert_close(maps.patch_grid(layer=1, query=0).flatten(), image[1, :, 0, 1:].mean(0))
    assert maps.cls_weight(layer=0) == pytest.approx(float(image[0, :, :, 0].mean()))


def test_inspect_answer_uses_the_positions_that_produced_each_token(tokenizer):
    torch.manual_seed(4)
    model = MiniMindVLM(tiny_config(tokenizer)).eval()
    prompt = sequence(tokenizer).tolist()
    features = torch.randn(1, IMAGE_TOKENS, 64)
    answer = model.generate(torch.tensor([prompt]), features, max_new_tokens=4, temperature=0)[0].tolist()
    maps = inspect_answer(model, prompt, answer, features)
    assert maps.query_positions == answer_query_positions(len(prompt), len(answer)) == \
        list(range(len(prompt) - 1, len(prompt) - 1 + len(answer)))
    # greedy decoding: the inspected logits at those positions pick exactly the generated tokens
    assert maps.logits[maps.query_positions].argmax(-1).tolist() == answer


def test_bad_requests_are_clear_errors(tokenizer):
    model = MiniMindVLM(tiny_config(tokenizer))
    ids = sequence(tokenizer)
    with pytest.raises(ValueError, match="eval mode"):
        inspect_attention(model, ids)
    model.eval()
    with pytest.raises(ValueError, match="outside the sequence"):
        inspect_attention(model, ids, None, [len(ids)])
    with pytest.raises(ValueError, match="no image placeholder"):
        inspect_attention(model, ids, None, [1]).image_weights()
    with pytest.raises(ValueError, match="answer is empty"):
        inspect_answer(model, ids.tolist(), [], None)
