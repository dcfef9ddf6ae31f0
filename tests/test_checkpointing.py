"""Activation checkpointing per block (`DeltaLM.gradient_checkpointing_enable`, the trainer's
`run.activation_checkpointing`): the same gradients as the plain path for every preset, fewer
activations kept for backward, a clear answer for caches, and a clean disable."""

import warnings

import pytest
import torch
from model_helpers import ALL_VARIANTS, random_ids, tiny_model
from train_helpers import tiny_config

from deltalearn.models import DeltaLMCache
from deltalearn.models.outputs import CACHE_FIELD
from deltalearn.train.config import RESUMABLE_KEYS
from deltalearn.train.logging import read_log
from deltalearn.train.trainer import train

pytestmark = pytest.mark.filterwarnings(
    "ignore:`(gradient|is_gradient)_checkpointing.*:FutureWarning"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def _grads(model, ids, mask=None, gates=False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, attention_mask=mask, output_gates=gates)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, out


def _assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_checkpointed_grads_equal_plain(variant):
    model = tiny_model(variant).train()
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the conv histories are masked inside the checkpointed blocks
    plain, plain_out = _grads(model, ids, mask, gates=True)
    model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing
    assert all(block.gradient_checkpointing for block in model.layers)
    ckpt, ckpt_out = _grads(model, ids, mask, gates=True)
    # to round-off, not bit for bit: a checkpointed block ends its rewrite without the next block's
    # compressor read fused in (DELTALEARN_FUSED_READ), which sums in another order
    torch.testing.assert_close(ckpt_out.loss, plain_out.loss, rtol=1e-6, atol=0)
    _assert_same_grads(ckpt, plain)
    if plain_out.gates is None:
        assert model.config.residual == "additive" and ckpt_out.gates is None
    else:  # output_gates works with checkpointing on: the same gates
        for field in ("beta", "readout", "target", "discrepancy"):
            torch.testing.assert_close(
                getattr(ckpt_out.gates, field), getattr(plain_out.gates, field)
            )


@pytest.mark.parametrize("variant", ["ddl-tc", "ddl"])
def test_disable_restores_plain_model(variant):
    model = tiny_model(variant).train()
    ids = random_ids(2, 10)
    plain, _ = _grads(model, ids)
    model.gradient_checkpointing_enable()
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    assert not getattr(model, "_require_grads_hooks", [])  # the embedding hook is gone too
    again, _ = _grads(model, ids)
    _assert_same_grads(again, plain)
    # activation_checkpointing_enable (the transformers 5 name) switches the same blocks
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.layers)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing


def _saved_bytes(model, ids) -> int:
    """Bytes kept for backward by one training forward: distinct storages saved by autograd (the
    parameters excluded, they are resident anyway), plus each block's input, which the checkpoint
    keeps to recompute the block (counted on both paths, so the comparison favours the plain one)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    def keep_input(module, args):
        s = args[0].untyped_storage()
        saved[s.data_ptr()] = s.nbytes()

    hooks = [block.register_forward_pre_hook(keep_input) for block in model.layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("variant", ["baseline", "ddl-cc"])
def test_checkpointing_shrinks_saved_activations(variant):
    model = tiny_model(variant, num_layers=4).train()
    ids = random_ids(2, 64)
    plain = _saved_bytes(model, ids)
    model.gradient_checkpointing_enable()
    checkpointed = _saved_bytes(model, ids)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_cache_in_training_is_refused_or_dropped():
    model = tiny_model("ddl-tc").train()
    model.gradient_checkpointing_enable()
    ids = random_ids(2, 8)
    with pytest.warns(UserWarning, match="use_cache=False"):
        out = model(ids, use_cache=True)
    assert CACHE_FIELD not in out
    with pytest.raises(ValueError, match="cache cannot be passed .* activation checkpointing"):
        model(ids, past_key_values=DeltaLMCache())
    # without gradients (generation from a model in training mode) or in eval: the cache is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            assert getattr(model(ids, use_cache=True), CACHE_FIELD) is not None
        model.eval()
        assert getattr(model(ids, use_cache=True), CACHE_FIELD) is not None
        generated = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 7)


def test_trainer_option_gives_the_same_losses(tmp_path, cache, monkeypatch):
    from deltalearn.train import trainer

    assert "run.activation_checkpointing" in RESUMABLE_KEYS
    wrapped = []

    def spy(model, *args, **kwargs):
        wrapped.append(model.is_activation_checkpointing)
        return wrap_model(model, *args, **kwargs)

    wrap_model = trainer.wrap_model
    monkeypatch.setattr(trainer, "wrap_model", spy)
    losses = {}
    for on in (False, True):
        cfg = tiny_config(tmp_path / f"run-{on}", cache, "ddl-tc", steps=3, eval_interval=3)
        cfg.run.activation_checkpointing = on
        cfg.validate()
        assert train(cfg).status == "finished"
        losses[on] = [r["loss"] for r in read_log(tmp_path / f"run-{on}" / "log.jsonl")]
    assert wrapped == [False, True]  # the option reached the model before it was wrapped
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


def test_cli_flag_sets_the_option():
    from deltalearn.cli import _train_overrides, build_parser

    args = build_parser().parse_args(["train", "--activation-checkpointing"])
    assert _train_overrides(args)["run.activation_checkpointing"] is True
    assert "run.activation_checkpointing" not in _train_overrides(
        build_parser().parse_args(["train"])
    )
