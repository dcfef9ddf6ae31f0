"""Recording which CPU kernels run (tests of `ops/native.py` and `ops/prepared.py`)."""

from __future__ import annotations

from deltalearn.ops import native, prepared


def record_kernel_calls(monkeypatch, calls: list[str], general: bool = True) -> None:
    """Append the name of every prepared kernel call that runs to `calls`, and with `general` also
    every kernel the general path (`native._call`) runs."""
    real_run = prepared._Prepared._run

    def counted_run(self, *args):
        calls.append(self.name)
        return real_run(self, *args)

    monkeypatch.setattr(prepared._Prepared, "_run", counted_run)
    if general:
        real_call = native._call

        def counted_call(name, dtype, *args):
            calls.append(name)
            return real_call(name, dtype, *args)

        monkeypatch.setattr(native, "_call", counted_call)
