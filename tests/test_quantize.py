"""inference.cpu.quantize and inference.cpu.prepare: int8 keeps the greedy answers of a trained model, stays within a
documented logit tolerance on a random one, shrinks the decode weights, prints no torch warnings, and refuses
models it cannot or should not convert."""
from __future__ import annotations

import argparse
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from inference.cpu import quantize
from inference.cpu.prepare import add_cpu_inference_args, choose_cpu_kernel, prepare_for_cpu_inference
from inference.cpu.kernels import current_kernel, decode_linears
from inference.cpu.quantize import is_int8, quantize_int8
from model.vlm import MiniMindVLM

PROMPT_LEN = 8
SEQ_LEN = 32


@pytest.fixture(scope="module")
def random_model() -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def trained() -> tuple[MiniMindVLM, torch.Tensor]:
    """A tiny model trained to continue one fixed 32-token sequence, and that sequence: its greedy answer is a
    real prediction with clear margins, as a trained model's mostly is (a random model's logits are near ties)."""
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config())
    seq = torch.randint(10, 6000, (1, SEQ_LEN))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small only wait on each other across threads
    try:
        for _ in range(60):
            loss = F.cross_entropy(model(seq).logits[0, :-1], seq[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), seq


def greedy(model: MiniMindVLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=n, temperature=0.0)


def test_int8_keeps_the_greedy_answer_of_a_trained_model(trained):
    model, seq = trained
    fp32 = greedy(model, seq[:, :PROMPT_LEN], SEQ_LEN - PROMPT_LEN)
    assert torch.equal(fp32, seq[:, PROMPT_LEN:])  # the fp32 model learnt the sequence
    int8 = quantize_int8(copy.deepcopy(model))
    assert torch.equal(greedy(int8, seq[:, :PROMPT_LEN], SEQ_LEN - PROMPT_LEN), fp32)


def test_int8_logits_stay_within_tolerance_on_a_random_model(random_model):
    """Tolerance: the int8 logits' RMS error is under 10% of the fp32 logits' spread (per-row weight scales and
    per-row int8 activations; measured about 3% here). A random model's greedy tokens are near ties, so they are
    compared only where fp32's top-2 margin exceeds twice the largest error seen."""
    ids = torch.randint(10, 6000, (2, 24), generator=torch.Generator().manual_seed(1))
    int8 = quantize_int8(copy.deepcopy(random_model))
    with torch.inference_mode():
        ref, out = random_model(ids).logits, int8(ids).logits
    err = out - ref
    assert err.pow(2).mean().sqrt() < 0.1 * ref.std()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * err.abs().max()
    assert torch.equal(out.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_int8_replaces_the_decode_linears_and_their_fp32_weights(random_model):
    model = quantize_int8(copy.deepcopy(random_model))
    assert is_int8(model) and current_kernel(model) == "int8"
    linears = [linear for _, _, linear in decode_linears(model)]
    # per block: q, k and v stacked into one (inference.cpu.stacked: wqkv), wo, w1 and w3 stacked (w13), w2; the head
    assert len(linears) == 2 * 4 + 1 and all(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in linears)
    assert all(m.weight().dtype == torch.qint8 for m in linears)
    # no fp32 copy of a block weight is left; the embedding (tied to the head in fp32) keeps its own
    assert not any(p.dim() == 2 for p in model.layers.parameters())
    assert model.tok_embeddings.weight.dtype == torch.float32


def test_quantisation_prints_no_torch_warnings(random_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = quantize_int8(copy.deepcopy(random_model))
        greedy(model, torch.tensor([[5, 6, 7]]), 2)
    assert [str(w.message) for w in caught] == []


def test_bad_models_are_refused_with_a_clear_error(random_model):
    model = quantize_int8(copy.deepcopy(random_model))
    with pytest.raises(ValueError, match="already quantised to int8"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="already runs on the int8 CPU kernel"):
        choose_cpu_kernel(model, "auto")
    with pytest.raises(ValueError, match="int8 quantisation runs on CPU; the model is on meta"):
        quantize_int8(copy.deepcopy(random_model).to("meta"))  # meta stands in for a GPU here
    with pytest.raises(ValueError, match="takes fp32 weights; the model's are bfloat16"):
        quantize_int8(copy.deepcopy(random_model).to(torch.bfloat16))
    converted = copy.deepcopy(random_model)
    choose_cpu_kernel(converted, "transposed")
    with pytest.raises(ValueError, match="already runs on the transposed CPU kernel"):
        quantize_int8(converted)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_is_refused(random_model):
    with pytest.raises(ValueError, match="int8 quantisation runs on CPU; the model is on cuda"):
        quantize_int8(copy.deepcopy(random_model).cuda())


def test_prepare_for_cpu_inference_and_its_flags(random_model):
    args = argparse.ArgumentParser()
    add_cpu_inference_args(args)
    assert vars(args.parse_args([])) == {"quantize": "none", "cpu_kernel": "auto"}
    flags = args.parse_args(["--quantize", "int8"])
    model = copy.deepcopy(random_model)
    assert prepare_for_cpu_inference(model, flags.quantize, flags.cpu_kernel).startswith("CPU kernel: int8")
    assert is_int8(model)
    with pytest.raises(ValueError, match="--cpu_kernel onednn applies to fp32 linear layers"):
        prepare_for_cpu_inference(copy.deepcopy(random_model), "int8", "onednn")
    with pytest.raises(ValueError, match="--cpu_kernel compiled applies to fp32 linear layers"):
        prepare_for_cpu_inference(copy.deepcopy(random_model), "int8", "compiled")
    same = copy.deepcopy(random_model)  # --cpu_kernel int8 is --quantize int8
    assert prepare_for_cpu_inference(same, "none", "int8").startswith("CPU kernel: int8 (") and is_int8(same)
    with pytest.raises(ValueError, match="unknown quantisation 'int4'"):
        prepare_for_cpu_inference(copy.deepcopy(random_model), "int4", "auto")
    line = prepare_for_cpu_inference(copy.deepcopy(random_model), "none", "default")
    assert line == "CPU kernel: default (asked for)"


def test_the_chat_loader_quantises_on_request(tmp_path, tokenizer, tiny_clip_dir):
    from conftest import PROJECT_TOKENIZER, TOKENIZER_PATH
    from PIL import Image

    from inference.chat import GenerationSettings, VLMChat
    from checkpoints.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(MiniMindVLM(tiny_config(tokenizer)), ckpt, tokenizer=PROJECT_TOKENIZER)
    chat = VLMChat.load(ckpt, str(tiny_clip_dir), TOKENIZER_PATH, quantize="int8")
    assert chat.kernel_line.startswith("CPU kernel: int8") and is_int8(chat.model)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=4)
    assert isinstance("".join(chat.stream("what colour?", Image.new("RGB", (32, 32)), settings=settings)), str)
    plain = VLMChat.load(ckpt, str(tiny_clip_dir), TOKENIZER_PATH)
    assert plain.kernel_line == "CPU kernel: default (asked for)" and current_kernel(plain.model) == "default"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao's own, called directly here
def test_stacking_the_projections_does_not_change_the_int8_model(random_model):
    """quantize_int8 stacks wq/wk/wv and w1/w3 before quantising; each weight row keeps its own scale and the
    stacked layers quantise the same input once, so the logits are those of the layers quantised one by one."""
    stacked = quantize_int8(copy.deepcopy(random_model))
    separate = copy.deepcopy(random_model)
    torch.ao.quantization.quantize_dynamic(separate, {"layers": quantize._QCONFIG, "output": quantize._QCONFIG},
                                           dtype=torch.qint8, inplace=True)
    assert len(decode_linears(separate)) == 2 * 7 + 1
    ids = torch.tensor([[5, 17, 99, 240, 3, 77, 1000, 12]])
    with torch.inference_mode():
        assert torch.allclose(stacked(ids).logits, separate(ids).logits, atol=1e-5, rtol=1e-5)
