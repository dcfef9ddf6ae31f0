"""DDL residual connections: the rewrite step (`DeltaUpdate`) and a drop-in wrapper (`DeltaResidual`).

x_in = X                (dv = 1)       or   Compress(X)  (dv > 1)
c    = RMSNorm(x_in)
h    = F(c)                                                  the wrapped branch
X'   = X + h                                                 rule="additive"
     = X + β k (vᵀ − kᵀX),  k = h/‖h‖, v = v(c, x_in), β = β(c)   rule="delta"
     = X + β k vᵀ                                            rule="write_only"
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from deltalearn.nn.calls import plain_call
from deltalearn.nn.choices import (
    DIRECTION_FORMS,
    RULES,
    DirectionForm,
    GateKind,
    Rule,
    ValueHeadKind,
    check_choice,
)
from deltalearn.nn.generators import (
    GateHead,
    ValueHead,
    direction,
    gate_and_value,
    projection_dtypes,
)
from deltalearn.nn.state import ChannelCompressor
from deltalearn.ops import (
    backend,
    channel_mix,
    delta_rewrite_reference,
    extension,
    native,
    prepared,
    state_tape,
    token_mix,
    write_only_reference,
)
from deltalearn.ops._shapes import accumulation_dtype, autocast_on, no_autocast
from deltalearn.ops.backend import native_allowed
from deltalearn.ops.epilogue import (
    epilogue_generators,
    rewrite_epilogue,
    update_kernel_enabled,
)
from deltalearn.ops.state_chain import StateChain

# Tensor types a kernel reads directly (nn.Parameter is a plain tensor; a subclass may not be).
_PLAIN = (torch.Tensor, nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN)


@dataclass
class GateRecord:
    """What one rewrite did, per token (detached). Shapes: `(...)` for β, `(..., dv)` otherwise
    (`dv` squeezed away for a vector state)."""

    beta: torch.Tensor
    readout: torch.Tensor  # kᵀX before the write
    target: torch.Tensor  # v
    discrepancy: torch.Tensor  # v − kᵀX


class DeltaUpdate(nn.Module):
    """The Rewrite step of a DDL sublayer: owns the value and gate heads, applies the update rule.

    `forward(X, h, c, u)`: state X `(..., d)` or `(..., d, dv)`, branch output h `(..., d)` (the raw
    direction k̃), normalised context c and un-normalised sublayer input u (both `(..., d)`).
    Set `record = True` to keep a `GateRecord` of the last call in `last_record`.

    `fused=True` hands the gate logits and the value pre-activation to `rewrite_epilogue` (one Triton
    kernel on CUDA), which normalises h, squashes both and rewrites in fp32; it takes the L2 form
    of the direction, which the "rms" form equals algebraically. `fused=False` composes the
    generators and `delta_rewrite_reference` step by step, in `direction_form`.
    """

    def __init__(
        self,
        dim: int,
        value_channels: int = 1,
        *,
        rule: Rule = "delta",
        value_head: ValueHeadKind = "paper",
        value_sigmoid_scale: float = 4.0,
        gate: GateKind = "linear",
        gate_hidden: int = 128,
        beta_init: float = 1.0,
        k_eps: float = 1e-5,
        direction_form: DirectionForm = "l2",
        fused: bool = True,
    ) -> None:
        super().__init__()
        check_choice("rule", rule, RULES)
        check_choice("direction_form", direction_form, DIRECTION_FORMS)
        if rule == "additive":
            raise ValueError("DeltaUpdate has no parameters for rule='additive'; add h directly")
        if value_channels < 1:
            raise ValueError(f"value_channels must be >= 1, got {value_channels}")
        if k_eps < 0:
            raise ValueError(f"k_eps must be >= 0, got {k_eps}")
        self.rule = rule
        self.value_channels = value_channels
        self.k_eps = k_eps
        self.direction_form = direction_form
        self.fused = fused
        self.value = ValueHead(dim, value_channels, value_head, value_sigmoid_scale)
        self.gate = GateHead(dim, gate, gate_hidden, beta_init)
        self.record = False
        self.last_record: GateRecord | None = None
        # The inference kernel's call as last prepared (prepared.InferenceUpdate), reused while
        # it holds: one-token decoding repeats the same call at every token.
        self._inference_plan: prepared.InferenceUpdate | None = None

    def forward(
        self,
        X: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        u: torch.Tensor,
        compress: torch.Tensor | None = None,
        *,
        c_norm: nn.Module | None = None,
        chain: StateChain | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The rewritten state; with `compress` (a channel compressor's `(d, dv)` mixing matrix)
        also the next sublayer's read of it, `(Y, x_next)`, read inside the Triton kernel when
        that runs — or, for a `(B, T, d, dv)` state, a token compressor's taps `(d, dv, K)`: its
        read of Y, whose gradient the Triton backward kernel takes in. `c_norm`: the module that made c from u (`c = c_norm(u)`), where the caller
        knows it; an RMSNorm (`rms_norm_parameters`) lets the Triton path recompute c from u in
        backward instead of keeping a copy of it under autocast (the official value head).
        `chain`: a compiled DeltaLM training forward's state chain (`ops/state_chain.py`): the
        rewrite keeps no state for backward and rebuilds X there."""
        if chain is not None:  # compiled: the projections, then the chained rewrite
            return self._general_update(X, h, c, u, compress, X.dim() == h.dim(), chain)
        if compress is not None and compress.dim() == 3:
            return self._update_and_token_read(X, h, c, u, compress, c_norm)
        # Without autograd on CPU: the whole update in one call whose checks run in C++
        # (ops/extension.py), else the prepared ctypes call (ops/prepared.py). native_allowed
        # first: it checks torch.compile before anything untraceable. Not on another device,
        # where the calls would only decline (host time, which bounds GPU decoding).
        if (
            not torch.is_grad_enabled()
            and not self.record
            and self.fused
            and native_allowed()
            and X.is_cpu
        ):
            fast = extension.loaded()
            out = None if fast is None else self._extension_update(fast, X, h, c, u, compress)
            if out is not None:
                return out
            plan = self._inference_plan
            if plan is not None and plan.holds(self, X, h, c, u, compress):
                return plan(X, h, c, u)
        vector = X.dim() == h.dim()  # vector state: scalar target
        if vector and self.value_channels != 1:
            raise ValueError(
                f"a vector state {tuple(X.shape)} needs value_channels=1, got {self.value_channels}"
            )
        if not self.fused:
            out = self._forward_reference(X, h, c, u, vector)
            return out if compress is None else (out, channel_mix(out, compress))
        weights = self._native_update_weights(X, h, c, u, compress, vector)
        if weights is not None:
            value = self._modules["value"]
            if torch.is_grad_enabled():  # projections and rewrite as one autograd node
                out = native.update_native(
                    X, h, c, u, *weights, compress, self.rule, value.kind, value.sigmoid_scale,
                    self.k_eps,
                )  # fmt: skip
            else:
                plan = prepared.InferenceUpdate(
                    X, h, weights, compress, self.rule, value.kind, value.sigmoid_scale,
                    self.k_eps,
                )  # fmt: skip
                self._inference_plan = plan
                out = plan(X.contiguous(), h.contiguous(), c.contiguous(), u.contiguous())
            if self.record:
                self._record_from_inputs(X, h, c, u, vector)
            return out
        weights = self._triton_update_weights(X, h, c, u, compress, vector)
        if weights is not None:  # CUDA: projections and rewrite in one Triton kernel each way
            out = self._triton_update(X, h, c, u, weights, compress, c_norm)
            if self.record:
                self._record_from_inputs(X, h, c, u, vector)
            return out
        return self._general_update(X, h, c, u, compress, vector)

    def _update_and_token_read(self, X, h, c, u, taps, c_norm) -> tuple[torch.Tensor, torch.Tensor]:
        """`(Y, x_next)`: the rewrite and the next sublayer's token-compressor read of Y, taps
        `(d, dv, K)` (`TokenCompressor.taps`), Y `(B, T, d, dv)` read with no past. On the Triton
        update the read runs inside its Function and its gradient joins ∂Y in the update's
        backward kernel (`ops.triton_epilogue._bwd_tile`): Y's two gradients are never summed
        apart. Elsewhere the rewrite, then the read, as the two calls would give them."""
        vector = X.dim() == h.dim()
        weights = None
        if not vector and X.dim() == 4 and taps.shape[:2] == X.shape[-2:]:
            weights = self._triton_update_weights(X, h, c, u, None, vector)
        if weights is not None and taps.device == X.device and taps.dtype in backend.KERNEL_DTYPES:
            out = self._triton_update(X, h, c, u, weights, taps, c_norm)
            if self.record:
                self._record_from_inputs(X, h, c, u, vector)
            return out
        Y = self.forward(X, h, c, u, c_norm=c_norm)
        with no_autocast(Y):  # as `TokenCompressor.read_inputs` reads a state
            return Y, token_mix(Y, taps, 0)

    def _general_update(self, X, h, c, u, compress, vector: bool, chain=None):
        """The projections (autograd through the generators' modules), then `rewrite_epilogue`."""
        # (...) fp32, (..., dv); no saved-tensor hooks unless u is a state (ops.state_tape)
        z, p = state_tape.outside(gate_and_value, self.gate, self.value, c, u)
        if vector:
            p = p.squeeze(-1)
        value_head, value_scale = self.value.kind, self.value.sigmoid_scale
        out = rewrite_epilogue(
            X, h, z, p, rule=self.rule, value_head=value_head, value_scale=value_scale,
            k_eps=self.k_eps, compress=compress, chain=chain,
        )  # fmt: skip
        if self.record:
            self._keep_record(X, h, z, p)
        return out

    def _triton_update_weights(self, X, h, c, u, compress, vector: bool) -> tuple | None:
        """`(w_gate, b_gate, W_value, b_value)` where the whole update runs as one Triton kernel
        each way (`ops.triton_epilogue.update_triton`: CUDA tensors in the kernels' dtypes, or the
        "triton" backend; the linear gate; plain tensors: a tensor-parallel DTensor weight has no
        whole matrix a kernel could read, its projections stay DTensor products;
        DELTALEARN_UPDATE_KERNEL not "off"), else None."""
        weights = self._linear_gate_weights()
        if weights is None or not self._fits(X, h, c, u, compress, vector, weights):
            return None
        operands = _operands(X, h, c, u, weights, compress)
        if not set(map(type, operands)) <= _PLAIN_SET or not update_kernel_enabled():
            return None
        return weights if backend.use_triton(operands) else None

    def _triton_update(self, X, h, c, u, weights, compress, c_norm=None):
        update_triton = _triton_epilogue().update_triton
        value = self._modules["value"]
        keep, lin = projection_dtypes(c, accumulation_dtype(c))
        norm = None  # only where training would keep a copy of c (autocast): host time
        official_copy = value.kind == "official" and keep not in (None, c.dtype)
        if c_norm is not None and official_copy and torch.is_grad_enabled():
            norm = rms_norm_parameters(c_norm, u)
        return update_triton(
            X, h, c, c if value.kind == "paper" else u, *weights, compress, rule=self.rule,
            value_head=value.kind, value_scale=value.sigmoid_scale, k_eps=self.k_eps, keep=keep,
            lin=lin, norm=norm,
        )  # fmt: skip

    def _fits(self, X, h, c, u, compress, vector: bool, weights) -> bool:
        """Whether the operands have the shapes of one update of this module's width and value
        channels (else the general path runs, which names what is wrong)."""
        dv = self.value_channels
        state_fits = X.shape == h.shape if vector else X.shape == (*h.shape, dv)
        if not (state_fits and c.shape == h.shape and u.shape == h.shape):
            return False
        if compress is not None and (vector or compress.shape != (h.shape[-1], dv)):
            return False
        return weights[0].shape[-1] == h.shape[-1]

    def _record_from_inputs(self, X, h, c, u, vector: bool) -> None:
        """`last_record` where a kernel formed the projections itself: they again, outside the
        graph, only to record."""
        with torch.no_grad():
            z, p = gate_and_value(self.gate, self.value, c, u)
        self._keep_record(X, h, z, p.squeeze(-1) if vector else p)

    def _keep_record(self, X: torch.Tensor, h: torch.Tensor, z: torch.Tensor, p: torch.Tensor):
        """`last_record` from the epilogue's operands: the generators again, outside the fused
        op and the graph, only to record."""
        value = self._modules["value"]
        with torch.no_grad():
            k, beta, v = epilogue_generators(
                h, z, p, value_head=value.kind, value_scale=value.sigmoid_scale, k_eps=self.k_eps
            )
        self.last_record = _record(X, k, beta, v)

    def decode_update(
        self,
        fast,
        X: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        u: torch.Tensor,
        compress: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """`self(X, h, c, u, compress)` as one call of the inference extension `fast`, without the
        module call and the checks that pick the path — for a caller that made those checks once
        for many updates (`DeltaLM.forward`: no autograd, the fast paths allowed, `fast` loaded).
        None, nothing computed, where the module call must run: hooks on this module, the
        reference path, gate records, an MLP gate, or inputs the extension declines. Decoding one
        token at a time on a CPU is bound by host work; this saves a third of an update's host time."""
        if self.record or not self.fused or not plain_call(self, DeltaUpdate):
            return None
        return self._extension_update(fast, X, h, c, u, compress)

    def _extension_update(self, fast, X, h, c, u, compress) -> torch.Tensor | tuple | None:
        weights = self._linear_gate_weights()
        if weights is None:
            return None
        value = self._modules["value"]
        return fast.update(
            X, h, c, u, *weights, compress, self.rule == "delta",
            value.kind == "official", value.sigmoid_scale, self.k_eps,
        )  # fmt: skip

    def _native_update_weights(self, X, h, c, u, compress, vector: bool) -> tuple | None:
        """`(w_gate, b_gate, W_value, b_value)` where the whole update, projections included,
        runs on the C kernels (one call without autograd: `ops.prepared.InferenceUpdate`; one
        autograd Function with it: `ops.native.update_native`, unless DELTALEARN_UPDATE_KERNEL
        is "off"), else None: the linear gate, no autocast, CPU tensors of one fp32 or float64
        dtype (with or without a gate record, so that activation checkpointing recomputes what
        the forward ran). Decoding one token at a time is bound by host work (a dozen
        dispatched ops per update otherwise), and a CPU training step spent about as much on
        the projections' products as on the rewrite. Shapes that do not fit go the general way,
        which names what is wrong."""
        # First, the device: on CUDA none of the checks below can pass (host time counts there).
        if not X.is_cpu or autocast_on("cpu") or not native.fits(X, not vector):
            return None
        if torch.is_grad_enabled() and not update_kernel_enabled():
            return None  # the projections apart, then the epilogue kernel
        weights = self._linear_gate_weights()
        if weights is None or not self._fits(X, h, c, u, compress, vector, weights):
            return None
        return weights if backend.use_native(_operands(X, h, c, u, weights, compress)) else None

    def _linear_gate_weights(self) -> tuple[torch.Tensor, ...] | None:
        """`(w_gate, b_gate, W_value, b_value)` of the linear gate (None for the MLP gate), read
        from the module dicts (`self.gate.out.weight` costs ~2 µs through `nn.Module.__getattr__`)."""
        gate = self._modules["gate"]._modules
        if gate.get("hidden") is not None:
            return None
        gate_out = gate["out"]._parameters
        value = self._modules["value"]._modules["proj"]._parameters
        return gate_out["weight"], gate_out["bias"], value["weight"], value["bias"]

    def _forward_reference(
        self, X: torch.Tensor, h: torch.Tensor, c: torch.Tensor, u: torch.Tensor, vector: bool
    ) -> torch.Tensor:
        # k in (at least) fp32: a bf16 k is 1e-3 off unit norm, so a β = 1 write would miss v.
        k = direction(
            h.to(torch.promote_types(h.dtype, torch.float32)), self.k_eps, self.direction_form
        )
        beta = self.gate(c)
        v = self.value(c, u)  # (..., dv)
        if vector:
            v = v.squeeze(-1)
        v = v.to(X.dtype)
        op = delta_rewrite_reference if self.rule == "delta" else write_only_reference
        out = op(X, k, beta, v)
        if self.record:
            self.last_record = _record(X, k, beta, v)
        return out


def rms_norm_parameters(norm: nn.Module, u: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """`(weight, eps)` where `norm(u)` is `rms_norm(u, (d,), weight, eps)` and nothing else — a
    `torch.nn.RMSNorm` with a weight and an ε, or a module whose class says how it normalises
    (`rms_norm_parameters()`, as `deltalearn.models.layers.RMSNorm`), called plainly (no hooks)
    — with the weight a plain `(d,)` tensor on u's device; else None. What lets a rewrite
    recompute c from u rather than keep it."""
    if isinstance(norm, nn.RMSNorm) and plain_call(norm, nn.RMSNorm):
        weight, eps = norm.weight, norm.eps
    else:
        # The class that says how it normalises must be the one whose forward runs.
        owner = _rms_norm_owner(type(norm))
        if owner is None or not plain_call(norm, owner):
            return None
        weight, eps = owner.rms_norm_parameters(norm)
    if weight is None or eps is None or type(weight) not in _PLAIN:
        return None
    if weight.shape != u.shape[-1:] or weight.device != u.device:
        return None
    return weight, float(eps)


@functools.cache
def _triton_epilogue() -> ModuleType:
    """`ops.triton_epilogue`, imported at the first call (triton is an optional extra) and not at
    every update: an import statement costs ~0.6 µs even when the module is loaded (0.05 here)."""
    from deltalearn.ops import triton_epilogue

    return triton_epilogue


@functools.cache
def _rms_norm_owner(cls: type) -> type | None:
    """The class in `cls`'s MRO that defines `rms_norm_parameters` (looked up once a class)."""
    return next((k for k in cls.__mro__ if "rms_norm_parameters" in vars(k)), None)


def _operands(X, h, c, u, weights: tuple, compress) -> list[torch.Tensor]:
    """An update's tensors for the backend checks: the state, h, c, u, the weights (b_value may be
    None) and the mixing matrix where given — a list made without generators (a dozen Python
    calls fewer an update: host time, which bounds eager training on a GPU)."""
    operands = [X, h, c, u, *weights] if weights[3] is not None else [X, h, c, u, *weights[:3]]
    if compress is not None:
        operands.append(compress)
    return operands


@torch.no_grad()
def _record(X: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, v: torch.Tensor) -> GateRecord:
    kf, Xf = k.float(), X.float()
    with no_autocast(X):  # the einsum is a bmm, which autocast would run in bf16
        if X.dim() == k.dim():
            readout = (kf * Xf).sum(-1)
        else:
            readout = torch.einsum("...d,...dv->...v", kf, Xf)
    return GateRecord(
        beta=beta.detach().float(),
        readout=readout,
        target=v.detach().float(),
        discrepancy=v.detach().float() - readout,
    )


class DeltaResidual(nn.Module):
    """Wrap any residual branch `F: (..., dim) -> (..., dim)` as a DDL residual connection.

    Args:
        dim: width d of the branch input/output.
        branch: the residual branch F (attention, MLP, conv-as-linear, ...).
        value_channels: dv; 1 keeps an ordinary vector state `(..., dim)`, more needs a matrix state
            `(..., dim, dv)` (see `repeat_expansion`) and uses `compressor` to read it.
        rule: "delta" (DDL), "write_only" (the control) or "additive" (exactly `x + F(RMSNorm(x))`).
        value_head, gate, gate_hidden, beta_init, k_eps, direction_form: the generators (SPEC §2).
        compressor: module `(..., dim, dv) -> (..., dim)`; default a `ChannelCompressor` when dv > 1.
        norm_eps: epsilon of the pre-norm RMSNorm.
        fused: the fused rewrite epilogue (default; one Triton kernel on CUDA) or the plain
            reference composition (see `DeltaUpdate`).
        record_gates: keep β, readout, target and discrepancy of the last call in `last_gates`.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        >>> layer = DeltaResidual(64, mlp)
        >>> y = layer(torch.randn(8, 64))     # same shape; layer.last_gates holds β, readout, ...
    """

    def __init__(
        self,
        dim: int,
        branch: nn.Module,
        value_channels: int = 1,
        *,
        rule: Rule = "delta",
        value_head: ValueHeadKind = "paper",
        value_sigmoid_scale: float = 4.0,
        gate: GateKind = "linear",
        gate_hidden: int = 128,
        beta_init: float = 1.0,
        k_eps: float = 1e-5,
        direction_form: DirectionForm = "l2",
        compressor: nn.Module | None = None,
        norm_eps: float = 1e-6,
        fused: bool = True,
        record_gates: bool = True,
    ) -> None:
        super().__init__()
        check_choice("rule", rule, RULES)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if value_channels < 1:
            raise ValueError(f"value_channels must be >= 1, got {value_channels}")
        self.dim = dim
        self.value_channels = value_channels
        self.rule = rule
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.branch = branch
        if value_channels > 1 and compressor is None:
            compressor = ChannelCompressor(dim, value_channels)
        self.compressor = compressor
        self.update: DeltaUpdate | None = None
        if rule != "additive":
            self.update = DeltaUpdate(
                dim,
                value_channels,
                rule=rule,
                value_head=value_head,
                value_sigmoid_scale=value_sigmoid_scale,
                gate=gate,
                gate_hidden=gate_hidden,
                beta_init=beta_init,
                k_eps=k_eps,
                direction_form=direction_form,
                fused=fused,
            )
            self.update.record = record_gates

    @property
    def record_gates(self) -> bool:
        return self.update is not None and self.update.record

    @record_gates.setter
    def record_gates(self, on: bool) -> None:
        if self.update is not None:
            self.update.record = on

    @property
    def last_gates(self) -> GateRecord | None:
        """β, readout kᵀX, target v and discrepancy of the last call (None for additive or
        when `record_gates` is off)."""
        return None if self.update is None else self.update.last_record

    def _check_state(self, X: torch.Tensor) -> None:
        want = (self.dim,) if self.value_channels == 1 else (self.dim, self.value_channels)
        if X.dim() < len(want) or tuple(X.shape[-len(want) :]) != want:
            shape = "(..., dim)" if self.value_channels == 1 else "(..., dim, value_channels)"
            raise ValueError(
                f"state must have shape {shape} ending in {want}, got {tuple(X.shape)}"
            )

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self._check_state(X)
        x_in = X if self.compressor is None else self.compressor(X)
        return residual_step(X, x_in, self.norm, self.branch, self.update)


def residual_step(
    X: torch.Tensor,
    x_in: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor],
    branch: Callable[[torch.Tensor], torch.Tensor],
    update: DeltaUpdate | None,
    compress: torch.Tensor | None = None,
    fast=None,
    chain: StateChain | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm DDL sublayer from its read state: `c = norm(x_in)`, `h = branch(c)`, then the
    rewrite `update(X, h, c, x_in)`, or `X + h` for the additive rule (`update` None), where a
    matrix state `(..., d, dv)` receives `h` in every value channel. With `compress` (a `(d, dv)`
    mixing matrix, or a token compressor's `(d, dv, K)` taps; rewrites only) the pair `(X', x_next)` of `DeltaUpdate.forward`. `fast`: the
    inference extension, where the caller checked that it may run (`DeltaUpdate.decode_update`).
    `chain`: the state chain of a compiled training forward (`DeltaUpdate.forward`), for a plain
    `DeltaUpdate` only."""
    # Saved-tensor hooks only where a state is read (ops.state_tape.outside): not in the branch,
    # nor in the norm of a compressed state's x_in.
    c = state_tape.outside(norm, x_in)
    h = state_tape.outside(branch, c)
    if h.shape != x_in.shape:
        raise ValueError(
            f"branch must map (..., {x_in.shape[-1]}) to the same shape; got {tuple(h.shape)} "
            f"for input {tuple(c.shape)}"
        )
    if update is None:
        if compress is not None:
            raise ValueError(
                "compress reads the state inside a rewrite; the additive rule has none"
            )
        return X + (h.unsqueeze(-1) if X.dim() == h.dim() + 1 else h)
    if fast is not None:
        out = update.decode_update(fast, X, h, c, x_in, compress)
        if out is not None:
            return out
    # No trailing None argument: forward hooks on the update see (X, h, c, u) as before.
    args = (X, h, c, x_in) if compress is None else (X, h, c, x_in, compress)
    # In training the norm that made c goes along (the Triton backward may recompute c from
    # x_in); a subclass's own forward gets the call it always had.
    if torch.is_grad_enabled() and type(update).forward is DeltaUpdate.forward:
        if chain is not None:
            return update(*args, c_norm=norm, chain=chain)
        return update(*args, c_norm=norm)  # no chain keyword: a forward set on the instance
    if chain is not None:
        raise ValueError(f"a state chain goes to a plain DeltaUpdate with autograd, got {update}")
    return update(*args)
