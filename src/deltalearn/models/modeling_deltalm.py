"""DeltaLM: one decoder-only Transformer for the baseline and every Deep Delta Learning variant.

Index legend: B batch, T new tokens, d width, dv value channels, L layers, V vocabulary.

    input_ids ─ embed ─ e (B, T, d)
      dv = 1:  X = e                                   vector state (B, T, d)
      dv > 1:  X = EC(e) or e 1ᵀ                        matrix state (B, T, d, dv)
    for each block (one compressor, shared by its two sublayers):
      X = sublayer(X, attention);  X = sublayer(X, SwiGLU MLP)
    logits = lm_head(RMSNorm(Compress_final(X) or X))   lm_head tied to embed

    sublayer(X, F):   x_in = Compress(X) if dv > 1 else X
                      c    = RMSNorm(x_in);  h = F(c)
                      X'   = X + h                          residual="additive"
                           = DeltaUpdate(X, h, c, x_in)     residual="delta" | "write_only"

Generation: `DeltaLMCache` holds the KV cache and the histories of the token-axis convolutions
(EC, TC); `DeltaLMStaticCache` is its fixed-shape form (`cache_implementation="static"`, for a
compiled decode step). With left padding, pad tokens are hidden from attention and zeroed
before every causal conv, and RoPE positions count real tokens only, so a padded row gives the
logits of the same row without padding.

Precision: the residual stream X has the dtype of the model's weights for every variant — fp32 for
an fp32 model, also under bf16/fp16 autocast (the embedding output is fp32, `X + h` promotes, and
the rewrite, the EC/TC convolutions and the CC compressor run with autocast off and return the
state's dtype). Autocast lowers only the branches (attention, MLP, value head) and the LM head; every
reduction of the rewrite (`kᵀX`) and the gate logits are fp32 (the direction k is normalised in
fp32 and passed on in the branch's dtype). A model cast to bf16 keeps a bf16 stream, with the rewrite
still accumulating in fp32.

Host syncs: the forward reads no tensor value on the host when its inputs live on an accelerator.
Out-of-range token ids raise `ValueError` for CPU inputs; on CUDA they trip an asynchronous
device-side assert (`torch._assert_async`), which surfaces as a CUDA error at a later
synchronisation and leaves the CUDA context unusable. An `attention_mask` on the CPU that marks no
padding is dropped (plain causal attention); on an accelerator it is always applied, since finding
out would need a sync (the logits are the same either way).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel, StaticCache
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from deltalearn.models.cache import ConvInputCache, DeltaLMCache, DeltaLMStaticCache
from deltalearn.models.compiling import compile_kwargs
from deltalearn.models.configuration_deltalm import DeltaLMConfig
from deltalearn.models.layers import (
    MLP,
    Attention,
    OutProj,
    RMSNorm,
    attention_mask_4d,
    fixed_length_mask,
    rope_angles,
)
from deltalearn.models.loss import next_token_loss
from deltalearn.models.outputs import CACHE_FIELD, DeltaLMGates, DeltaLMOutput
from deltalearn.nn import (
    ChannelCompressor,
    DeltaUpdate,
    EmbeddingConv,
    GateHead,
    TokenCompressor,
    beta_init_bias,
    repeat_expansion,
    residual_step,
)
from deltalearn.nn.calls import plain_call
from deltalearn.ops import backend, extension, state_chain, state_tape
from deltalearn.ops.backend import native_allowed
from deltalearn.ops.epilogue import fused_read_enabled, fused_token_read_enabled

Compressor = ChannelCompressor | TokenCompressor


@dataclass
class _Step:
    """Per-forward context shared by all blocks."""

    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, T, 1, D/2)
    attn_mask: torch.Tensor | None  # (B|1, 1, T, S) bool, or None for plain causal
    token_mask: torch.Tensor | None  # (B, T) 1 = real token, 0 = padding; None = no padding
    cache: DynamicCache | None
    # Checked once a forward instead of at each of its calls (one decoded token makes dozens):
    # the inference extension where the forward may call it directly (`DeltaLM._fast_calls`),
    # and whether channel-compressor reads are fused into the rewrite before them.
    fast: ModuleType | None = None
    fuse_reads: bool = False
    # Whether every token-compressor read comes out of the rewrite before it (training with the
    # fused token read on: `DeltaLM._fuses_token_reads`).
    token_reads: bool = False
    # The channel read a block's MLP rewrite makes for the next reader (`DeltaLM._carried_reads`):
    # that reader's compressor, set before the block runs; and what the rewrite hands on,
    # (state, read, mixing matrix), taken only by a reader whose input is that very state.
    next_read: ChannelCompressor | None = None
    carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # A compiled training forward's state chain, where every rewrite takes it
    # (`DeltaLM._starts_state_chain`): the rewrites then rebuild their input states in backward.
    chain: state_chain.StateChain | None = None

    def take_carry(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(read, mixing matrix) the block before read from `X` itself, once; else None. Nothing
        is written where nothing was carried: a checkpointed block (which carries nothing) may not
        change what lies outside it under torch.compile ("HOP: Unsafe side effect")."""
        carried = self.carry
        if carried is None:
            return None
        self.carry = None
        return None if carried[0] is not X else carried[1:]


def _make_compressor(config: DeltaLMConfig) -> Compressor | None:
    if not config.expanded:
        return None
    d, dv, k = config.hidden_size, config.value_channels, config.compressor_kernel_size
    return ChannelCompressor(d, dv, k) if config.compressor == "cc" else TokenCompressor(d, dv, k)


def _make_update(config: DeltaLMConfig) -> DeltaUpdate | None:
    if config.residual == "additive":
        return None  # the baseline has no DDL parameters at all
    return DeltaUpdate(
        config.hidden_size,
        config.value_channels,
        rule=config.residual,
        value_head=config.value_head,
        value_sigmoid_scale=config.value_sigmoid_scale,
        gate=config.gate,
        gate_hidden=config.gate_hidden_size,
        beta_init=config.beta_init,
        k_eps=config.k_eps,
        direction_form=config.direction_form,
    )


def _mask_padding(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the pad tokens of `x` `(B, T, ...)`, so that a causal conv sees them as left padding."""
    if token_mask is None:
        return x
    return x * token_mask.view(*token_mask.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def _read_state(
    compress: Compressor | None, X: torch.Tensor, step: _Step, key: str
) -> torch.Tensor:
    """x_in: the state itself (dv = 1) or its compression, keeping the conv history in the cache."""
    if compress is None:
        return X
    K1 = compress.history_len
    if K1 == 0:  # CC reads only the current token
        if step.fast is not None and plain_call(compress, ChannelCompressor):
            read = compress.decode_read(step.fast, X)
            if read is not None:
                return read[0]
        return compress(X)
    if step.chain is not None:  # compiled training: the read gets X back in backward
        return step.chain.token_read(X, compress.taps())
    if step.token_mask is not None:
        X = _mask_padding(X, step.token_mask)
    cache = step.cache
    if cache is None:
        return compress(X)
    if step.fast is not None and isinstance(cache, DeltaLMCache):
        params = compress._parameters  # the new inputs appended, then read where they lie
        x_in = cache.convolve_appending(
            key, X, K1, step.fast.token_read, params["weight"], params["read"]
        )
        if x_in is not None:
            return x_in
    if _reads_in_place(cache):
        cache.append_conv(key, X, K1)
        return compress.read_inputs(cache.conv_history(key, K1 + X.shape[1]), K1)
    x_in, _ = compress.forward_cached(X, cache.conv_history(key, K1))
    cache.append_conv(key, X, K1)  # all inputs: exact `crop`
    return x_in


def _called_plainly(block: nn.Module) -> bool:
    """Whether calling `block` runs `DeltaLMBlock.forward` alone: no hook, no forward of its own
    (either could hand on a state other than the one its rewrites wrote)."""
    return plain_call(block, DeltaLMBlock) and "forward" not in block.__dict__


def _reads_in_place(cache: ConvInputCache) -> bool:
    """Whether a convolution reads its window straight out of `cache` after appending to it:
    either cache without autograd. One-token decoding then spends no concatenation of history and
    input, per convolution and token, on the host; and in a compiled static-cache step the read
    follows the write, so Inductor writes the buffer in place — read before it, the old buffer was
    still in use after the write, and the step copied the whole buffer twice (`max_cache_len`
    tokens, per convolution and token)."""
    return isinstance(cache, (DeltaLMCache, DeltaLMStaticCache)) and not torch.is_grad_enabled()


class DeltaLMBlock(GradientCheckpointingLayer):
    """One Transformer block; its residual interface is chosen by the config (module docstring).

    A `GradientCheckpointingLayer`: after `DeltaLM.gradient_checkpointing_enable()` its forward
    runs under `torch.utils.checkpoint` in training (the step context rides along as a positional
    argument; `DeltaLM.forward` makes sure it holds no cache then, since the recompute would write
    the KV cache and the conv histories a second time).
    """

    def __init__(self, config: DeltaLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.compress = _make_compressor(config)
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.attn_update = _make_update(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_update = _make_update(config)

    def sublayer(
        self,
        X: torch.Tensor,
        norm: RMSNorm,
        branch: Callable[[torch.Tensor], torch.Tensor],
        update: DeltaUpdate | None,
        step: _Step,
        key: str,
    ) -> torch.Tensor:
        """One pre-norm sublayer: read the state, run the branch on its norm, write it back."""
        x_in = _read_state(self._modules.get("compress"), X, step, key)
        return residual_step(X, x_in, norm, branch, update, fast=step.fast, chain=step.chain)

    def forward(self, X: torch.Tensor, step: _Step) -> torch.Tensor:
        m = self._modules  # not nn.Module.__getattr__: ~0.5 µs a lookup, per block and token
        attn = partial(m["attn"], rope=step.rope, mask=step.attn_mask, cache=step.cache)
        attn_update, mlp_update = m.get("attn_update"), m.get("mlp_update")  # None: additive
        if step.token_reads:
            return self._forward_token_reads(X, step, attn)
        if self._fuses_read(step.fuse_reads):
            # The MLP sublayer's channel-compressor read comes out of the attention rewrite (the
            # Triton kernel reads each row as it writes it): one pass over the state fewer.
            compress, fast = m["compress"], step.fast
            read = step.take_carry(X)  # the block before read it in its MLP rewrite
            if read is None and fast is not None:
                read = compress.decode_read(fast, X)
            x_in, C = compress.read_with_matrix(X) if read is None else read  # C: both reads
            chain = step.chain
            X, x_next = residual_step(X, x_in, m["attn_norm"], attn, attn_update, C, fast, chain)
            reader = step.next_read
            C_next = None if reader is None else reader.mixing_matrix()
            if C_next is None or C_next.device != X.device:
                mlp = m["mlp"]
                return residual_step(X, x_next, m["mlp_norm"], mlp, mlp_update, None, fast, chain)
            # The next reader's read too, out of the MLP rewrite: no pass of its own over the state
            # (nor, in backward, its gradient's pass and sum into the state's).
            mlp_norm, mlp = m["mlp_norm"], m["mlp"]
            X, x_carry = residual_step(X, x_next, mlp_norm, mlp, mlp_update, C_next, fast, chain)
            step.carry = X, x_carry, C_next
            return X
        i = self.layer_idx
        X = self.sublayer(X, m["attn_norm"], attn, attn_update, step, f"{i}.attn")
        return self.sublayer(X, m["mlp_norm"], m["mlp"], mlp_update, step, f"{i}.mlp")

    def _forward_token_reads(self, X: torch.Tensor, step: _Step, attn: Callable) -> torch.Tensor:
        """The block with each token-compressor read made by the rewrite before it
        (`DeltaUpdate(..., compress=taps)`): the attention rewrite reads for the MLP, the MLP
        rewrite for the next block (or the final read), carried on `step`."""
        m = self._modules
        compress = m["compress"]
        carried = step.take_carry(X)  # the block before read X in its MLP rewrite
        x_in = compress(X) if carried is None else carried[0]
        taps = compress.taps()
        X, x_next = residual_step(X, x_in, m["attn_norm"], attn, m["attn_update"], taps)
        reader = step.next_read
        if reader is None:
            return residual_step(X, x_next, m["mlp_norm"], m["mlp"], m["mlp_update"])
        mlp_norm, mlp, mlp_update = m["mlp_norm"], m["mlp"], m["mlp_update"]
        next_taps = reader.taps()
        X, x_carry = residual_step(X, x_next, mlp_norm, mlp, mlp_update, next_taps)
        step.carry = X, x_carry, next_taps  # as a channel read carries its matrix
        return X

    def _fuses_read(self, switched_on: bool | None = None) -> bool:
        """The fused read (`ops.epilogue.fused_read_enabled`, unless the forward read it already:
        `switched_on`) needs a channel compressor (it reads only the current token) and the fused
        rewrite."""
        if not (fused_read_enabled() if switched_on is None else switched_on):
            return False
        modules = self._modules  # not nn.Module.__getattr__: ~0.5 µs a lookup, per block and token
        update = modules.get("attn_update")
        compress = modules.get("compress")
        return isinstance(compress, ChannelCompressor) and update is not None and update.fused


class DeltaLM(PreTrainedModel, GenerationMixin):
    """Decoder-only LM with additive, delta or write-only residuals (see `DeltaLMConfig`)."""

    config_class = DeltaLMConfig
    base_model_prefix = "deltalm"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}
    _no_split_modules = ["DeltaLMBlock"]
    _supports_sdpa = True
    # Per block: DeltaLMBlock is a GradientCheckpointingLayer.
    supports_gradient_checkpointing = True

    def __init__(self, config: DeltaLMConfig) -> None:
        super().__init__(config)
        d, dv = config.hidden_size, config.value_channels
        self.embed = nn.Embedding(config.vocab_size, d)
        self.expand = (
            EmbeddingConv(d, dv, config.expansion_kernel_size)
            if config.expanded and config.expansion == "ec"
            else None
        )
        self.layers = nn.ModuleList(DeltaLMBlock(config, i) for i in range(config.num_layers))
        self.final_compress = _make_compressor(config)
        self.norm = RMSNorm(d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool | None = None,
        output_gates: bool = False,
        *,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> DeltaLMOutput | tuple:
        """Logits for `input_ids` `(B, T)` (`(B, T, V)`, or the last `logits_to_keep` positions).

        Every argument is named below; anything else is a `TypeError` naming it (no `**kwargs`).

        Args:
            labels: `(B, T)`; the loss is the mean cross-entropy of predicting `labels[:, 1:]` from
                positions `:-1` (shifted inside), ignoring `-100`.
            attention_mask: `(B, S)` with S = cached + new tokens, 1 = real token, 0 = padding
                (left padding for batched generation).
            past_key_values / cache: a `DeltaLMCache` or `DeltaLMStaticCache` (or, for models
                without token-axis convs, any `transformers.DynamicCache` / `StaticCache`) from an
                earlier call; `cache` is the name `generate` uses.
            use_cache: return a cache (a new `DeltaLMCache` if none was passed); defaults to True
                exactly when a cache was passed.
            output_gates: also return `gates`, a `DeltaLMGates` of every rewrite (None for additive).
            position_ids: RoPE positions `(B, T)`; by default counted over real tokens only.
            logits_to_keep: compute logits for the last this many positions only (0 = all).
            return_dict: False returns `DeltaLMOutput.to_tuple()` instead of the output object.
            output_attentions, output_hidden_states: accepted as None/False (`generate` and other
                callers pass them); True raises `ValueError`: this model returns neither.
            inputs_embeds: accepted as None only; DeltaLM reads token ids.
            cache_position: accepted for callers that pass it (older `generate`); the positions of
                the new tokens are the cache's length onwards, so it is checked for shape only.
        """
        if output_attentions or output_hidden_states:
            name = "output_attentions" if output_attentions else "output_hidden_states"
            raise ValueError(
                f"{name}=True is not supported: DeltaLM does not return attentions or hidden "
                "states (output_gates=True returns β, readouts and discrepancies of every rewrite)"
            )
        if inputs_embeds is not None:
            raise ValueError("DeltaLM takes input_ids; inputs_embeds is not supported")
        if input_ids is None:
            raise ValueError("input_ids is required: token ids of shape (batch, tokens)")
        if past_key_values is not None and cache is not None:
            raise ValueError("pass the cache as either past_key_values or cache, not both")
        cache = cache if cache is not None else past_key_values
        self._check_ids(input_ids)
        if cache_position is not None and tuple(cache_position.shape[-1:]) != (input_ids.shape[1],):
            raise ValueError(
                f"cache_position must hold one position per new token ({input_ids.shape[1]}), "
                f"got shape {tuple(cache_position.shape)}"
            )
        use_cache = cache is not None if use_cache is None else use_cache
        checkpointing = self._checkpointing_now
        if checkpointing and cache is not None:
            raise ValueError(
                "a cache cannot be passed while activation checkpointing is on in training with "
                "gradients (the recompute would write it twice); call model.eval(), run under "
                "torch.no_grad() or call gradient_checkpointing_disable() first"
            )
        if checkpointing and use_cache:
            warnings.warn(
                "use_cache=True is incompatible with activation checkpointing in training "
                "(the recompute would write the cache twice); setting use_cache=False",
                stacklevel=2,
            )
            use_cache = False
        if use_cache and cache is None:
            cache = DeltaLMCache()
        if cache is not None and not isinstance(cache, ConvInputCache) and self._has_conv_history:
            raise ValueError(
                "this model keeps short-convolution histories (EC/TC); pass a DeltaLMCache (or "
                f"a DeltaLMStaticCache for a fixed-shape cache), got {type(cache).__name__}"
            )
        step = self._prepare_step(input_ids, attention_mask, position_ids, cache)
        updates = self._updates()
        final_compress = self.final_compress
        if updates or final_compress is not None:  # the baseline calls none of it
            step.fast = self._fast_calls(step.rope[0].device)
            step.fuse_reads = self.config.expanded and fused_read_enabled()
            step.token_reads = self._fuses_token_reads(step, checkpointing)

        # Attributes set only where they change: nn.Module.__setattr__ costs ~2 µs, three per
        # rewrite and forward, which one decoded token at a time notices.
        for u in updates:
            if u.record != output_gates:
                u.record = output_gates
        rebuild = len(updates) > 0 and not checkpointing and self._rebuilds_states()
        try:
            # A plain nullcontext otherwise: torch.compile traces through that.
            with state_tape.recording() if rebuild else nullcontext() as tape:
                X = self._embed(input_ids, step)
                if tape is not None:
                    tape.add(X)
                readers = self._carried_reads(step, checkpointing, input_ids.shape[1])
                if not checkpointing and self._starts_state_chain(X, step, readers, updates):
                    step.chain = state_chain.StateChain(X)
                for block, reader in zip(self.layers, readers, strict=True):
                    step.next_read = reader
                    X = block(X, step)
                carried = step.take_carry(X)  # the last MLP rewrite made the final read
                if carried is None:
                    x = _read_state(final_compress, X, step, "final")
                else:
                    x = carried[0]  # (B, T, d)
                if step.chain is not None:
                    x = step.chain.finish(x)
                x = self.norm(x)
            gates = self._collect_gates(updates) if output_gates and updates else None
        finally:
            for u in updates:
                if u.record:
                    u.record = False
                if u.last_record is not None:
                    u.last_record = None

        keep = logits_to_keep if labels is None else 0  # the loss needs every position
        logits = self.lm_head(x[:, -keep:] if keep else x)  # (B, T, V)
        loss = None
        if labels is not None:
            # The targets shifted left (the last position ignored), not the logits sliced: a
            # slice of the (B, T, V) logits is a copy forward and a zero-filled (B, T, V) tensor
            # in backward, ~12% of a `tiny` training step on a CPU; the loss is the same mean.
            targets = labels.to(logits.device)
            ignored = targets.new_full((targets.shape[0], 1), -100)
            loss = next_token_loss(logits, torch.cat([targets[:, 1:], ignored], dim=1))
        out = DeltaLMOutput(loss=loss, logits=logits, gates=gates)
        if use_cache:  # a None entry would still show up as a key of the output
            out[CACHE_FIELD] = cache
        if return_dict is None:
            return_dict = self.config.return_dict
        return out if return_dict else out.to_tuple()

    def _prepare_step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicCache | None,
    ) -> _Step:
        """RoPE angles, the attention mask and the padding mask of the new tokens."""
        if isinstance(cache, StaticCache):
            return self._prepare_static_step(input_ids, attention_mask, position_ids, cache)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        token_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(
                    f"attention_mask must have shape (batch, cached + new tokens) = {(B, S)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            # Dropping a mask without padding saves the masked attention path, but finding out
            # reads the mask on the host: only done where that costs no device sync.
            if attention_mask.device.type == "cpu" and not bool((attention_mask == 0).any()):
                attention_mask = None  # all real tokens: plain causal attention
            else:
                token_mask = attention_mask[:, past:]  # (B, T)
                if token_mask.device.type == "cpu" and bool(token_mask.all()):
                    token_mask = None  # the new tokens are all real: nothing to zero in them
        if position_ids is None:
            if attention_mask is not None:  # count real tokens only (pads get position 0)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, S, device=input_ids.device).expand(B, T)
        return _Step(
            rope=rope_angles(position_ids, self.config.head_dim, self.config.rope_theta),
            attn_mask=attention_mask_4d(attention_mask, T, S, input_ids.device),
            token_mask=token_mask,
            cache=cache,
        )

    def _prepare_static_step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: StaticCache,
    ) -> _Step:
        """`_prepare_step` for a fixed-shape cache: keys span all its slots, and the cache length
        stays a device tensor, so a compiled decode step neither re-traces nor syncs per token.
        Padding and positions are read off the mask (a real token sees itself; its position is
        the number of real tokens it sees, minus one)."""
        B, T = input_ids.shape
        device = input_ids.device
        num_keys = cache.layers[0].max_cache_len
        queries = cache.get_seq_length() + torch.arange(T, device=device)  # (T,) absolute slots
        allowed = fixed_length_mask(attention_mask, queries, num_keys)  # (B|1, 1, T, K)
        token_mask = None
        if attention_mask is not None:
            rows = allowed[:, 0]  # (B|1, T, K)
            own_slot = queries.view(1, T, 1).expand(rows.shape[0], T, 1)
            token_mask = rows.gather(-1, own_slot).squeeze(-1).expand(B, T)
            if position_ids is None:
                position_ids = (rows.sum(-1) - 1).clamp(min=0).expand(B, T)
        if position_ids is None:
            position_ids = queries.expand(B, T)
        own_key = torch.arange(num_keys, device=device)[None, :] == queries[:, None]  # (T, K)
        return _Step(
            rope=rope_angles(position_ids, self.config.head_dim, self.config.rope_theta),
            attn_mask=allowed | own_key,  # a pad query sees itself: no NaN row (attention_mask_4d)
            token_mask=token_mask,
            cache=cache,
        )

    def _embed(self, input_ids: torch.Tensor, step: _Step) -> torch.Tensor:
        """The initial state X_0: `(B, T, d)` for dv = 1, `(B, T, d, dv)` otherwise."""
        e = self.embed(input_ids)  # (B, T, d)
        if not self.config.expanded:
            return e
        # Looked up once: nn.Module.__getattr__ finds a submodule only after an AttributeError
        # Python formats (~1.5 µs a lookup, which one decoded token at a time notices).
        expand = self.expand
        if expand is None:
            return repeat_expansion(e, self.config.value_channels)
        e = _mask_padding(e, step.token_mask)
        if step.cache is None:
            return expand(e)
        K1 = expand.history_len
        if step.fast is not None and isinstance(step.cache, DeltaLMCache):
            weight = expand._parameters["weight"]  # appended, then expanded where they lie
            X = step.cache.convolve_appending("embed", e, K1, step.fast.expand, weight)
            if X is not None:
                return X
        if _reads_in_place(step.cache):
            step.cache.append_conv("embed", e, K1)
            return expand.expand_inputs(step.cache.conv_history("embed", K1 + e.shape[1]))
        X, _ = expand.forward_cached(e, step.cache.conv_history("embed", K1))
        step.cache.append_conv("embed", e, K1)  # all inputs: exact `crop`
        return X

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}"
            )
        if torch.compiler.is_compiling():
            return  # the check reads a tensor on the host: a graph break under torch.compile
        V = self.config.vocab_size
        if input_ids.device.type == "cuda":  # no host sync: a device-side assert (module docstring)
            in_range = ((input_ids >= 0) & (input_ids < V)).all()
            torch._assert_async(in_range, f"token ids must lie in [0, {V - 1}] (vocab_size {V})")
            return
        if input_ids.device.type == "meta":
            return  # no values to check
        bad = (input_ids < 0) | (input_ids >= V)
        if bool(bad.any()):  # free on the CPU; a sync on other accelerators, which lack the assert
            raise ValueError(
                f"token id {int(input_ids[bad][0])} is out of range for vocab_size {V} "
                f"(ids must lie in [0, {V - 1}])"
            )

    @property
    def _checkpointing_now(self) -> bool:
        """Whether this forward's blocks run under activation checkpointing (the condition of
        `GradientCheckpointingLayer`: enabled, training, gradients on)."""
        return (
            self.training
            and torch.is_grad_enabled()
            and any(block.gradient_checkpointing for block in self.layers)
        )

    def _activation_checkpointing_disable(self) -> None:
        super()._activation_checkpointing_disable()
        # Enabling also hooked the embedding to make its output require grad (for frozen
        # embeddings, e.g. PEFT); drop that hook too, so that disabling restores the plain model.
        self.disable_input_require_grads()

    def _carried_reads(self, step: _Step, checkpointing: bool, tokens: int) -> list:
        """For each block, the channel compressor whose read its MLP rewrite makes and hands on
        (the next block's, the last block's the final one's), or None: with the fused read on,
        every block fusing its own (`DeltaLMBlock._fuses_read`) and called plainly (no hooks, no
        replaced forward: nothing between two blocks may change the state handed on), a plain
        `ChannelCompressor` reading next. Not under activation checkpointing (a block's
        recompute would hand on a read outside its checkpoint) and not for one new token, where
        forming the next mixing matrix in PyTorch ops costs more host time than the read's one
        call of the inference extension."""
        blocks = list(self._modules["layers"]._modules.values())
        if step.token_reads:  # every reader a plain TokenCompressor (`_fuses_token_reads`)
            return [block._modules["compress"] for block in blocks[1:]] + [self.final_compress]
        none = [None] * len(blocks)
        if not step.fuse_reads or checkpointing or tokens < 2:
            return none
        for block in blocks:
            if not _called_plainly(block):
                return none
            if not block._fuses_read(True):
                return none
        after = [block._modules["compress"] for block in blocks[1:]] + [self.final_compress]
        return [
            r if isinstance(r, ChannelCompressor) and plain_call(r, ChannelCompressor) else None
            for r in after
        ]

    def _fuses_token_reads(self, step: _Step, checkpointing: bool) -> bool:
        """Whether this forward hands each token-compressor read to the rewrite before it
        (`DeltaLMBlock._forward_token_reads`; DELTALEARN_FUSED_TOKEN_READ): training, eager, not
        under activation checkpointing, no cache and no padding, every read a plain
        `TokenCompressor`, every block called plainly and every update a plain fused delta or
        write-only `DeltaUpdate` (nothing may come between a rewrite and the read it makes)."""
        if checkpointing or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        if step.cache is not None or step.token_mask is not None or not self.config.expanded:
            return False
        if self.config.compressor != "tc" or not fused_token_read_enabled():
            return False
        blocks = list(self._modules["layers"]._modules.values())
        reads = [b._modules.get("compress") for b in blocks] + [self.final_compress]
        if not all(
            isinstance(r, TokenCompressor) and plain_call(r, TokenCompressor) for r in reads
        ):
            return False
        if not all(_called_plainly(b) for b in blocks):
            return False
        updates = [b._modules.get(name) for b in blocks for name in ("attn_update", "mlp_update")]
        return all(
            isinstance(u, DeltaUpdate) and u.fused and plain_call(u, DeltaUpdate) for u in updates
        )

    def _starts_state_chain(
        self, X: torch.Tensor, step: _Step, readers: list, updates: list[DeltaUpdate]
    ) -> bool:
        """Whether this forward rebuilds its states in backward through a state chain
        (`ops/state_chain.py`, DELTALEARN_COMPILED_REBUILD; never under activation
        checkpointing, whose recompute would run the chain twice): a compiled forward with autograd,
        no cache and no padding, in fp32 or float64, outside the reference backend, whose every
        state after the first is made by a plain fused `DeltaUpdate` and read either only inside
        the rewrites (every channel read carried: `_carried_reads`) or by token compressors.
        Eager forwards rebuild through the state tape."""
        if not (torch.compiler.is_compiling() and torch.is_grad_enabled() and updates):
            return False
        if step.cache is not None or step.token_mask is not None or not state_chain.enabled():
            return False
        if X.dtype not in (torch.float32, torch.float64) or backend.backend() == "reference":
            return False
        blocks = list(self._modules["layers"]._modules.values())
        if not all(_called_plainly(b) for b in blocks):
            return False  # a hook or a forward of its own could hand on a state of its own
        reads = [b._modules.get("compress") for b in blocks] + [self.final_compress]
        token_reads = all(
            isinstance(r, TokenCompressor) and plain_call(r, TokenCompressor) for r in reads
        )
        if not token_reads and any(r is None for r in readers):
            return False
        return all(u.fused and plain_call(u, DeltaUpdate) for u in updates)

    @staticmethod
    def _fast_calls(device: torch.device) -> ModuleType | None:
        """The inference extension (`ops/extension.py`) where this forward's rewrites and reads
        may call it directly: no autograd, outside torch.compile and functorch transforms, the
        fast paths allowed (`ops.backend`), the extension built and the forward on the CPU (its
        calls take CPU tensors only: elsewhere each would decline, host time that bounds decoding
        on a GPU). Each call still declines inputs it does not take (the general path then names
        what is wrong)."""
        if torch.is_grad_enabled() or device.type != "cpu" or not native_allowed():
            return None
        return extension.loaded()

    @staticmethod
    def _rebuilds_states() -> bool:
        """Whether this forward keeps only its last state for backward and rebuilds the others
        from it (`ops.state_tape`): with autograd, outside `torch.compile`, unless switched off,
        inside a torch.func transform, or under saved-tensor hooks of the caller's (`save_on_cpu`,
        a checkpoint around the model: theirs decide what is kept)."""
        return (
            torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and state_tape.rebuild_enabled()
            and state_tape.can_record()
        )

    @property
    def _has_conv_history(self) -> bool:
        return self.expand is not None or isinstance(self.final_compress, TokenCompressor)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`nn.Module.compile` (in place: state-dict keys stay unprefixed) with Inductor's
        mix-order reduction off unless `options` turns it on: it broke compiled DDL training on
        a GPU (`models/compiling.py`)."""
        super().compile(*args, **compile_kwargs(kwargs))

    def _updates(self) -> list[DeltaUpdate]:
        """The rewrite modules in order: layer 0 attention, layer 0 MLP, layer 1 attention, ..."""
        # Through the module dicts: nn.Module.__getattr__ costs ~1 µs a module, per forward.
        blocks = [b._modules for b in self._modules["layers"]._modules.values()]
        return [
            u for b in blocks for u in (b.get("attn_update"), b.get("mlp_update")) if u is not None
        ]

    def _collect_gates(self, updates: list[DeltaUpdate]) -> DeltaLMGates:
        recs = [u.last_record for u in updates]
        L = len(self.layers)

        def stack(field: str, channel_axis: bool) -> torch.Tensor:
            xs = [getattr(r, field) for r in recs]
            if channel_axis and not self.config.expanded:
                xs = [x.unsqueeze(-1) for x in xs]  # vector state: dv = 1
            out = torch.stack(xs)  # (2L, B, T, ...)
            return out.view(L, 2, *out.shape[1:])

        return DeltaLMGates(
            beta=stack("beta", False),
            readout=stack("readout", True),
            target=stack("target", True),
            discrepancy=stack("discrepancy", True),
        )

    # ---- transformers glue ---------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # `generate` builds a plain DynamicCache; ours also carries the conv histories.
        out = super()._prepare_cache_for_generation(
            generation_config, model_kwargs, *args, **kwargs
        )
        for key in ("cache", "past_key_values"):
            if type(model_kwargs.get(key)) is DynamicCache:
                model_kwargs[key] = DeltaLMCache()
        return out

    def _prepare_static_cache(self, *args, **kwargs):
        # `cache_implementation="static"` builds a plain StaticCache; ours adds the conv inputs.
        cache = super()._prepare_static_cache(*args, **kwargs)
        return DeltaLMStaticCache.wrapping(cache) if type(cache) is StaticCache else cache

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # `_init_weights` only uses the guarded `transformers.initialization` functions, so the
        # custom-code shortcut (skip modules without direct parameters, e.g. GateHead) must not apply.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """SPEC §3: ≥2-D weights ~ N(0, (f/√d)²), output projections / √L, embedding std from the
        config, RMSNorm weights 1, EC the identity, gate output bias logit(β₀/2), read vectors 1/dv.
        Parents run after their children, so GateHead's bias overrides the generic Linear bias."""
        cfg = self.config
        std = cfg.init_std_factor / math.sqrt(cfg.hidden_size)
        if isinstance(module, nn.Embedding) or module is self.lm_head:
            init.normal_(module.weight, std=cfg.embedding_init_std)
        elif isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(cfg.num_layers) if isinstance(module, OutProj) else 1.0
            init.normal_(module.weight, std=std * scale)
            if module.bias is not None:  # PyTorch's default, as the authors' value-head bias
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, GateHead):
            init.constant_(module.out.bias, beta_init_bias(module.beta_init))
            if module.hidden is not None:
                init.zeros_(module.hidden.bias)
        elif isinstance(module, ChannelCompressor | TokenCompressor):
            init.normal_(module.weight, std=std)
            init.constant_(module.read, 1.0 / module.value_channels)
        elif isinstance(module, EmbeddingConv):
            identity = torch.zeros_like(module.weight)
            identity[:, 0, -1] = 1.0
            init.copy_(module.weight, identity)
