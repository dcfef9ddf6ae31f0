"""Rebuild the residual states in backward instead of keeping them (training memory).

A DDL rewrite changes the state by a rank-1 term, `X' = X + (βk) eᵀ` with `e = v − kᵀX` (delta) or
`v` (write-only), and its backward keeps h, ρ = 1/‖h‖ (so k = ρh), β and e anyway — per row, d + dv
+ 2 numbers. So the state before a rewrite is one pass away from the state after it:

    X = X' − (βρh) eᵀ

Without this, autograd keeps every sublayer's input state for backward (the rewrite's ∂k needs it,
and so do the compressor reads' weight gradients and, for d_v = 1, the norm): d·d_v numbers per
token and sublayer, where the additive baseline keeps d. Within a `StateTape`, every tensor autograd
saves that *is* a registered state (by identity, or a view of one — or of the tensor a state is a
whole view of, as an EC model's first state is of its expansion's output) is kept as a handle instead;
the tape keeps only the states no rewrite has consumed (the last one, in a DeltaLM), and backward
rebuilds X_i from X_{i+1} as it walks down the model — autograd runs every consumer of X_{i+1}
before the rewrite that made it, so each state is rebuilt once, from the one above it. The cost is
one pass over the state per sublayer in backward; the rebuilt state differs from the kept one by
round-off (a few ulp of X_{i+1}; the errors add, they do not grow, down the chain).

Rewrites that can be inverted this way say so with `StateTape.link` (the C kernels, the Triton
kernels — whose backward rebuilds with one kernel too — and the PyTorch Function of the fused
epilogue); a state whose rewrite never links (the reference composition, a half-precision state)
stays kept as before. A delta update on the C or Triton kernels goes further where the state it
consumed is still to be rebuilt when its backward runs (`deferred`, `claim`, `rebuilt`): its
backward kernel reads Y anyway, so it forms X there and hands it to the tape — no rebuild pass of
its own, nor a read of X back (a vector state too, which the official value head reads as u: the
kernel takes u from the X it rebuilds, and adds u's gradient to X's). Every other saved tensor is
kept as it is where it has no graph (a weight, a kernel's row scalars) and as a detached alias
otherwise (returning an op's own output as-is would tie it to its own graph node: a reference
cycle autograd cannot free). Code that reads no state — a sublayer's branch, the norm and
projections of a compressed x_in — runs with the hooks off (`outside`), and so does a Triton
update that saves no state (`will_defer`, `without_hooks`): its saved tensors are autograd's as
usual, without a Python call each.
Second-order gradients (`create_graph=True`) are refused: a detached tensor carries none.

`DELTALEARN_REBUILD_STATES` ("on", the default, or "off"; or `REBUILD` below) switches it; DeltaLM
uses it in every forward with autograd except under activation checkpointing (which keeps no
states at all), `torch.compile`, torch.func transforms (which refuse saved-tensor hooks), and
saved-tensor hooks of the caller's (`save_on_cpu`, a checkpoint around the whole model), which keep
deciding what is saved.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deltalearn.ops.fused import rank1_update
from deltalearn.ops.switches import switched_on

# Module-level override of DELTALEARN_REBUILD_STATES (None: read the environment at each forward).
REBUILD: str | None = None
# State dtypes rebuilt: a half-precision Y is rounded, so Y − (βk)eᵀ would not give X back.
EXACT = (torch.float32, torch.float64)

_ACTIVE: contextvars.ContextVar[StateTape | None] = contextvars.ContextVar(
    "deltalearn_state_tape", default=None
)


def rebuild_enabled() -> bool:
    """Whether DeltaLM rebuilds states in backward (`REBUILD`, else DELTALEARN_REBUILD_STATES:
    "on", the default, or "off")."""
    return switched_on(
        REBUILD,
        "DELTALEARN_REBUILD_STATES",
        "deltalearn.ops.state_tape.REBUILD",
        "state rebuilding",
    )


def can_record() -> bool:
    """Whether a tape may record now: saved-tensor hooks allowed (torch.func transforms disallow
    them) and none active already (`torch.autograd.graph.save_on_cpu`, a non-reentrant checkpoint,
    a caller's own: a tape inside them would take their place)."""
    autograd = torch._C._autograd
    allowed = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    if allowed is not None and not allowed():
        return False
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is None


def active() -> StateTape | None:
    """The tape of the forward running now in this context, if any (never in a traced graph:
    DeltaLM does not record under torch.compile, and a context variable does not trace)."""
    if torch.compiler.is_compiling():
        return None
    return _ACTIVE.get()


class _Slot:
    """One registered state: `owner` the tensor autograd sees (weakly, to match by identity),
    `kept` a detached alias while the tape holds it, `link` how to rebuild it from the state
    above: `(above, h, rho, beta, e)`."""

    __slots__ = ("owner", "kept", "link", "layout")

    def __init__(self, state: torch.Tensor) -> None:
        self.owner = weakref.ref(state)
        self.kept: torch.Tensor | None = state.detach()
        self.link: tuple | None = None
        self.layout = (tuple(state.shape), state.stride(), state.dtype, state.device)


def _whole_view_base(state: torch.Tensor) -> torch.Tensor | None:
    """The tensor `state` is a view of, where `state` covers all of it in the same layout
    (contiguous, from its first element: an `unflatten` of a contiguous tensor, say), so that a
    rebuilt state — a new contiguous tensor — lies as that tensor did; else None."""
    base = state._base
    if base is None or state.storage_offset() != 0 or base.storage_offset() != 0:
        return None
    if state.numel() != base.numel() or not (state.is_contiguous() and base.is_contiguous()):
        return None
    return base


class _Handle:
    """What autograd keeps in place of a registered state (or a view of one)."""

    __slots__ = ("tape", "index", "view")

    def __init__(self, tape: StateTape, index: int, view: tuple | None) -> None:
        self.tape, self.index, self.view = tape, index, view


class StateTape:
    """The registered states of one forward and the links between them (module docstring).

    Use through `recording()`; rewrites call `link`, the model calls `add` for its first state.
    """

    def __init__(self) -> None:
        self._slots: list[_Slot] = []
        self._by_id: dict[int, int] = {}
        # A state that is a whole view of another tensor (`_whole_view_base`), by that tensor's
        # id: the slot and the tensor, weakly. Views of the state made from that tensor (a
        # reshape of it) have it as their `_base`, not the state.
        self._by_base: dict[int, tuple[int, weakref.ref]] = {}
        self._rebuilt: list[int] = []  # slots whose `kept` is a rebuilt state, in rebuild order

    # -- forward ---------------------------------------------------------------------------
    def add(self, state: torch.Tensor) -> int:
        """Register `state` (kept until a rewrite links it to its successor); its slot index."""
        index = self._find(state)
        if index is not None:
            return index
        self._slots.append(_Slot(state))
        index = len(self._slots) - 1
        self._by_id[id(state)] = index
        base = _whole_view_base(state)
        if base is not None:
            self._by_base[id(base)] = index, weakref.ref(base)
        return index

    def link(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        h: torch.Tensor,
        rho: torch.Tensor | None,
        beta: torch.Tensor,
        e: torch.Tensor,
    ) -> None:
        """Record that rewrite `Y = X + (β ρ h) eᵀ` happened (rows of h `(..., d)`, ρ and β
        `(...)` or `(..., 1)`, ρ None where h is k already; e `(..., dv)` for a matrix state or
        `(...)` for a vector one), so X can be rebuilt from Y. Y is registered; X stops being kept
        if it was registered, had no link yet, and X and Y are of one dtype in `EXACT`."""
        above = self.add(Y)
        index = self._find(X)
        if index is None or X.dtype != Y.dtype or X.shape != Y.shape or X.dtype not in EXACT:
            return
        slot = self._slots[index]
        if slot.link is not None or index == above:
            return
        lead = h.shape[:-1]
        slot.link = (
            above,
            _untied(h),
            None if rho is None else _rows_of(_untied(rho), lead),
            _rows_of(_untied(beta), lead),
            _untied(e),
        )
        slot.kept = None

    def registered(self, t: torch.Tensor) -> bool:
        """Whether `t` is a registered state or a view of one."""
        return self._find(t) is not None or (
            t._base is not None and self._find_base(t._base) is not None
        )

    def _find(self, t: torch.Tensor) -> int | None:
        index = self._by_id.get(id(t))
        if index is not None and self._slots[index].owner() is t:
            return index
        return None

    def _find_base(self, base: torch.Tensor) -> int | None:
        """The slot of the state whose views have `base` as their `_base`: the state itself, or
        the tensor the state is a whole view of."""
        index = self._find(base)
        if index is not None:
            return index
        found = self._by_base.get(id(base))
        if found is not None and found[1]() is base and self._slots[found[0]].owner() is not None:
            return found[0]
        return None

    # -- the saved-tensor hooks ----------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        index = self._find(t)
        if index is not None:
            return _Handle(self, index, None)
        base = t._base
        if base is not None:
            index = self._find_base(base)
            if index is not None:
                return _Handle(self, index, (tuple(t.shape), t.stride(), t.storage_offset()))
        if t.grad_fn is None:  # a weight, or made inside an op's forward: no graph to tie up
            return t
        return t.detach()  # not t itself: an op's saved output would keep its own graph alive

    @staticmethod
    def unpack(packed) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "second-order gradients (create_graph=True) through a DeltaLM forward need its "
                "states kept: set DELTALEARN_REBUILD_STATES=off (or deltalearn.ops.state_tape."
                "REBUILD = 'off') for that forward"
            )
        if type(packed) is not _Handle:
            return packed
        state = packed.tape.state(packed.index)
        if packed.view is None:
            # An alias of its own, not the tape's tensor: while anything holds it, the tape sees
            # its memory shared and writes no other rebuilt state into it (`_unshared`).
            return state.detach()
        size, stride, offset = packed.view
        return state.as_strided(size, stride, offset)

    # -- backward --------------------------------------------------------------------------
    def state(self, index: int) -> torch.Tensor:
        """The state of slot `index`: kept, or rebuilt from the nearest kept one above it."""
        slot = self._slots[index]
        if slot.kept is not None:
            return slot.kept
        chain = [index]  # walk up to a kept state, then rebuild down
        while self._slots[chain[-1]].kept is None:
            link = self._slots[chain[-1]].link
            if link is None:  # unreachable: `kept` is only dropped for a linked slot
                raise RuntimeError(f"state tape: slot {chain[-1]} has neither state nor link")
            chain.append(link[0])
        above = self._slots[chain.pop()].kept
        for i in reversed(chain):
            above = self._rebuild(i, above)
        return above

    def deferred(self, X: torch.Tensor) -> int | None:
        """The slot of `X` where the backward of the rewrite that consumed it may rebuild it itself,
        in the pass that reads the state after it anyway (`claim`, `rebuilt`; the delta backward of
        the C and the Triton kernels): X was linked and is contiguous. None otherwise (the tape
        rebuilds it)."""
        index = self._find(X)
        if index is None or not X.is_contiguous():
            return None
        slot = self._slots[index]
        linked = slot.link is not None and slot.link[2] is not None  # ρ: h is not k already
        return index if linked and slot.kept is None else None

    def will_defer(self, X: torch.Tensor) -> bool:
        """Whether a rewrite about to consume X, whose forward links X with ρ and whose delta
        backward rebuilds X itself, finds X `deferred` after that link (the same conditions,
        asked before it): a registered, contiguous state of a dtype in `EXACT`, not linked yet
        or linked and not kept. The caller may then save the rewrite's tensors without the hooks
        (`without_hooks`): none of them is a state the tape must keep."""
        index = self._find(X)
        if index is None or not X.is_contiguous() or X.dtype not in EXACT:
            return False
        slot = self._slots[index]
        return slot.link is None or (slot.link[2] is not None and slot.kept is None)

    def saves_no_state(self, X: torch.Tensor, saved: tuple[torch.Tensor, ...]) -> bool:
        """Whether a delta rewrite consuming X that saves X (deferred) and the tensors `saved` may
        run without the tape's hooks (`without_hooks`): its backward rebuilds X itself
        (`will_defer`) and none of `saved` is a state or a view of one, so the hooks would only
        pass each saved tensor through, a Python call each way — host time."""
        return self.will_defer(X) and not any(map(self.registered, saved))

    def claim(self, index: int) -> tuple[torch.Tensor | None, tuple | None]:
        """For that backward: `(state, None)` where slot `index` holds its state already (rebuilt
        for another reader), else `(None, (Y, rho, beta, e, out))`: the state after it and the row
        scalars it is rebuilt with (those `link` took), and memory of its layout to write it
        into, to be handed back by `rebuilt` — one pass over the state fewer than a rebuild of
        its own (1.15–1.2× at 2048 × 128 × 4 and × 256 × 4 on the C kernels, caches cold)."""
        slot = self._slots[index]
        if slot.kept is not None:
            return slot.kept, None
        above_index, _, rho, beta, e = slot.link
        above = self.state(above_index)
        size, stride, dtype, device = slot.layout
        out = self._release_above(above_index, slot.layout)
        if out is None:
            out = torch.empty_strided(size, stride, dtype=dtype, device=device)
        return None, (above, rho, beta, e, out)

    def state_after(self, index: int) -> torch.Tensor:
        """The state the rewrite that consumed slot `index` made (kept, or rebuilt from above)."""
        return self.state(self._slots[index].link[0])

    def rebuilt(self, index: int, X: torch.Tensor) -> None:
        """Slot `index` rebuilt as `X`: kept from now on until the rebuild two rewrites below."""
        self._slots[index].kept = X
        self._rebuilt.append(index)

    def _rebuild(self, index: int, above: torch.Tensor) -> torch.Tensor:
        slot = self._slots[index]
        above_index, h, rho, beta, e = slot.link
        size, stride, dtype, _ = slot.layout
        spare = self._release_above(above_index, slot.layout)
        if rho is not None and _native_takes(above, h, rho, beta, e):
            from deltalearn.ops import native

            X = native.rebuild_state(above, h, rho, beta, e, out=spare)
        elif rho is not None and _triton_takes(above, h):
            from deltalearn.ops.triton_epilogue import rebuild_state_triton

            # One kernel where the forward was one: the composition below is seven dispatched
            # ops, host time that eager training on a GPU is bound by.
            X = rebuild_state_triton(above, h, rho, beta, e, out=spare)
        else:
            scale = beta if rho is None else beta * rho
            write = h.to(dtype) * scale.to(dtype).unsqueeze(-1)  # (..., d): β k, as formed forward
            X = rank1_update(above, write, e.to(dtype), value=-1.0)
        if X.stride() != stride:  # a view of it was saved: the original layout
            X = torch.empty_strided(size, stride, dtype=dtype, device=X.device).copy_(X)
        self.rebuilt(index, X)
        return X

    def _release_above(self, above_index: int, layout: tuple) -> torch.Tensor | None:
        """Drop the rebuilt states more than one rewrite above the one being rebuilt (every reader
        has had them by now); return one of them no other tensor shares memory with and of
        `layout`, to write the new state into (a fresh state-sized buffer costs page faults on
        a CPU: 1.5 against 0.2 ms a rebuild at 2048 × 256 × 4)."""
        spare, keep = None, []
        for j in self._rebuilt:
            if j <= above_index:
                keep.append(j)
                continue
            slot = self._slots[j]
            old, slot.kept = slot.kept, None
            if spare is None and slot.layout == layout and _unshared(old):
                spare = old
        self._rebuilt = keep
        return spare

    def kept_count(self) -> int:
        """How many states the tape holds now (tests: one after a DeltaLM forward)."""
        return sum(slot.kept is not None for slot in self._slots)


def _untied(t: torch.Tensor) -> torch.Tensor:
    """`t` without its graph: `t` itself when it has none (the row scalars a kernel's forward
    makes), else a detached alias (one dispatched op fewer where none is needed)."""
    return t if t.grad_fn is None else t.detach()


def _rows_of(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """`t` shaped `lead` (one scalar a row): itself where it is already (no dispatched view)."""
    return t if t.shape == lead else t.reshape(lead)


def _unshared(t: torch.Tensor) -> bool:
    """Whether no tensor but `t` uses its memory (False where torch cannot say)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    # 2: `t` and the storage object asked; anything more is another tensor's view.
    return use_count is not None and use_count(t.untyped_storage()._cdata) == 2


def _native_takes(*tensors: torch.Tensor) -> bool:
    """Whether the C kernel rebuilds from these operands (one pass, no temporary): contiguous CPU
    tensors of one dtype the kernels take, the kernels allowed and built."""
    from deltalearn.ops import backend

    if not tensors[0].is_cpu:  # first: on a GPU nothing below can pass (host time counts there)
        return False
    return all(t.is_contiguous() for t in tensors) and backend.use_native(list(tensors))


def outside(fn, *args):
    """`fn(*args)` with the active tape's saved-tensor hooks off unless an argument is a
    registered state (or a view of one). A sublayer's branch reads only its normalised input, and
    a compressed state's norm and projections read x_in, not the state; the tensors they save
    (activations, weights: two dozen a sublayer) the hooks would only pass through, each by a
    Python call and a dispatched op — host time that bounds eager training on a GPU. Plain
    `fn(*args)` where no tape records or its hooks are not the innermost ones."""
    tape = active()
    if tape is None or any(isinstance(a, torch.Tensor) and tape.registered(a) for a in args):
        return fn(*args)
    return without_hooks(tape, fn, *args)


def without_hooks(tape: StateTape, fn, *args):
    """`fn(*args)` with `tape`'s saved-tensor hooks off, where they are the innermost ones (else
    plainly): for a caller that knows nothing `fn` saves is a state the tape must keep."""
    autograd = torch._C._autograd
    top_of = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    if top_of is None or not hasattr(autograd, "_pop_saved_tensors_default_hooks"):
        return fn(*args)
    top = top_of(False)
    if top is None or top[0] != tape.pack:
        return fn(*args)
    autograd._pop_saved_tensors_default_hooks()
    try:
        return fn(*args)
    finally:
        autograd._push_saved_tensors_default_hooks(*top)


def _triton_takes(above: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether the Triton kernel rebuilds from these operands: those its forward kernel took (the
    row scalars it wrote are fp32 and contiguous)."""
    from deltalearn.ops import backend

    return backend.use_triton([above, h])


@contextmanager
def recording() -> Iterator[StateTape]:
    """Run a forward with a new `StateTape` active (the saved-tensor hooks and `active()`)."""
    tape = StateTape()
    token = _ACTIVE.set(tape)
    try:
        with torch.autograd.graph.saved_tensors_hooks(tape.pack, StateTape.unpack):
            yield tape
    finally:
        _ACTIVE.reset(token)
