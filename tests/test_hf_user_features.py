"""Every Hugging Face feature a user reaches for, tried as a new user would: on the `model/`
folder of a run trained by `deltalearn train` (a tiny ddl-cc: an EC expansion, so the caches
carry a convolution history), loaded through the Auto classes after `import deltalearn`.

One test per feature, so a feature that breaks is named by its test.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from train_helpers import tiny_train_args
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    TextIteratorStreamer,
    pipeline,
)

import deltalearn  # noqa: F401  (registers DeltaLM with the Auto classes)
from deltalearn.cli import main as cli_main
from deltalearn.models import DeltaLMCache, DeltaLMStaticCache

PROMPTS = ["ROMEO:\nBut, soft", "JULIET:\nO Romeo, Romeo, wherefore art thou"]
NEW = 8

pytestmark = pytest.mark.filterwarnings(
    "ignore:`(gradient|is_gradient)_checkpointing.*:FutureWarning"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """`deltalearn train` for 30 steps; its `model/` folder (weights, config and tokenizer)."""
    root = tmp_path_factory.mktemp("user-run")
    args = tiny_train_args(root / "run", root / "cache", steps=30, eval_interval=30)
    assert cli_main(args) == 0
    return str(root / "run" / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


def _greedy(model, tokenizer, prompt: str, **kwargs) -> torch.Tensor:
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, **kwargs)
    return out[0, enc.input_ids.shape[1] :]


def test_auto_classes_load_the_trained_model(model, tokenizer):
    assert type(model).__name__ == "DeltaLM"
    assert (model.config.value_channels, model.config.compressor) == (4, "cc")
    assert tokenizer.padding_side == "left"
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc.input_ids).loss
    assert torch.isfinite(loss) and loss < math.log(model.config.vocab_size)  # better than uniform


def test_batched_pipeline_gives_each_prompt_its_own_tokens(model, tokenizer):
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, return_full_text=False)
    batched = pipe(PROMPTS, batch_size=2, **kwargs)
    for prompt, out in zip(PROMPTS, batched, strict=True):
        assert out[0]["generated_text"] == pipe(prompt, **kwargs)[0]["generated_text"], prompt


def test_batched_generate_with_attention_mask_equals_one_by_one(model, tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert (enc.attention_mask == 0).any()  # really padded
    with torch.no_grad():
        batch = model.generate(**enc, max_new_tokens=NEW, do_sample=False)
    for row, prompt in enumerate(PROMPTS):
        assert torch.equal(batch[row, -NEW:], _greedy(model, tokenizer, prompt)), prompt


def test_beam_search_returns_ranked_beams(model, tokenizer):
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=NEW,
            num_beams=3,
            num_return_sequences=3,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (3, enc.input_ids.shape[1] + NEW)
    scores = out.sequences_scores
    assert torch.all(scores[:-1] >= scores[1:])  # best beam first
    assert len({tuple(s.tolist()) for s in out.sequences}) == 3  # three different beams


def test_top_p_with_repetition_penalty_is_seeded_and_valid(model, tokenizer):
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    kwargs = dict(do_sample=True, top_p=0.9, temperature=0.9, repetition_penalty=1.3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            runs.append(model.generate(**enc, max_new_tokens=NEW, **kwargs))
    assert torch.equal(runs[0], runs[1])
    new = runs[0][0, enc.input_ids.shape[1] :]
    assert new.shape == (NEW,) and int(new.max()) < model.config.vocab_size


def test_streamer_yields_the_generated_text(model, tokenizer):
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, streamer=streamer)
    streamed = "".join(streamer)
    assert streamed == tokenizer.decode(out[0, enc.input_ids.shape[1] :])


def test_static_cache_generates_the_dynamic_tokens(model, tokenizer, monkeypatch):
    caches = []
    prepare = model._prepare_static_cache
    monkeypatch.setattr(
        model,
        "_prepare_static_cache",
        lambda *a, **k: caches.append(prepare(*a, **k)) or caches[-1],
    )
    for prompt in PROMPTS:
        static = _greedy(model, tokenizer, prompt, cache_implementation="static")
        assert torch.equal(static, _greedy(model, tokenizer, prompt)), prompt
    assert caches and all(type(c) is DeltaLMStaticCache for c in caches)


def test_assisted_and_prompt_lookup_decoding_equal_greedy(model, model_dir, tokenizer):
    crops = []
    crop = DeltaLMCache.crop

    def recording(self, max_length):
        crops.append(max_length)
        return crop(self, max_length)

    prompt = "ROMEO:\nBut, soft, but soft, but soft, but soft"
    greedy = _greedy(model, tokenizer, prompt)
    assistant = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeltaLMCache, "crop", recording)
        assert torch.equal(_greedy(model, tokenizer, prompt, assistant_model=assistant), greedy)
        assert torch.equal(_greedy(model, tokenizer, prompt, prompt_lookup_num_tokens=3), greedy)
    assert crops  # drafts were verified and the cache cut back


def test_gradient_checkpointing_gives_the_plain_gradients(model, tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    model.train()

    def grads():
        model.zero_grad(set_to_none=True)
        model(**enc, labels=enc.input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_peft_lora_step_trains_only_the_adapters(model, tokenizer):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    trainable = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    lora.train()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    loss = lora(**enc, labels=enc.input_ids).loss
    loss.backward()
    optimizer.step()
    params = dict(lora.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trainable.items())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())


def test_resize_token_embeddings_keeps_the_head_tied(model, tokenizer):
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 8)
    assert model.config.vocab_size == vocab + 8
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape[-1] == vocab + 8
    assert _greedy(model, tokenizer, PROMPTS[0]).shape == (NEW,)


def test_eager_attention_and_bf16_loads(model, model_dir, tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**enc).logits
        eager = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, attn_implementation="eager"
        ).eval()
        torch.testing.assert_close(eager(**enc).logits, reference, rtol=0, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no silent dtype surprises while loading
            bf16 = AutoModelForCausalLM.from_pretrained(
                model_dir, local_files_only=True, dtype=torch.bfloat16
            ).eval()
        assert bf16.embed.weight.dtype == torch.bfloat16
        logits = bf16(**enc).logits.float()
    real = enc.attention_mask.bool()
    assert (logits[real] - reference[real]).abs().max() < 0.25  # bf16 weights, fp32 reductions
    assert _greedy(bf16, tokenizer, PROMPTS[0]).shape == (NEW,)
