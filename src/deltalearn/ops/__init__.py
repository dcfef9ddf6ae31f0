"""The Delta operator as pure tensor functions (no parameters, any leading batch shape).

`delta_rewrite` and `write_only` are the fused paths (custom autograd); `*_reference` are the plain
spec implementations they are tested against.
"""

from deltalearn.ops.fused import delta_rewrite, write_only
from deltalearn.ops.reference import (
    delta_operator,
    delta_rewrite_reference,
    normalize_direction,
    shortcut_spectrum,
    write_only_reference,
)

__all__ = [
    "delta_operator",
    "delta_rewrite",
    "delta_rewrite_reference",
    "normalize_direction",
    "shortcut_spectrum",
    "write_only",
    "write_only_reference",
]
