"""The Delta operator as pure tensor functions (no parameters, any leading batch shape).

`delta_rewrite` and `write_only` are the fused paths (custom autograd); `*_reference` are the plain
spec implementations they are tested against. `rewrite_epilogue` is a whole sublayer's rewrite from
its projections (direction norm, gate, value head, rewrite) — one Triton kernel on CUDA.
`channel_mix` and `token_mix` are the CC and TC compressor reads with hand-written backwards.
"""

from deltalearn.ops.epilogue import rewrite_epilogue, rewrite_epilogue_reference
from deltalearn.ops.fused import delta_rewrite, write_only
from deltalearn.ops.mixing import channel_mix, channel_mix_reference
from deltalearn.ops.reference import (
    delta_operator,
    delta_rewrite_reference,
    normalize_direction,
    shortcut_spectrum,
    write_only_reference,
)
from deltalearn.ops.token_mixing import token_mix, token_mix_reference

__all__ = [
    "channel_mix",
    "channel_mix_reference",
    "delta_operator",
    "delta_rewrite",
    "delta_rewrite_reference",
    "normalize_direction",
    "rewrite_epilogue",
    "rewrite_epilogue_reference",
    "shortcut_spectrum",
    "token_mix",
    "token_mix_reference",
    "write_only",
    "write_only_reference",
]
