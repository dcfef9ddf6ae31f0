"""Running Triton kernel tests on CPU tensors under Triton's interpreter.

TRITON_INTERPRET=1 works only when set before triton is first imported (triton.language decorates its
own helpers, `tl.sum` and the like, for one mode at import), and torch imports triton early. So a
test module's kernel tests (those using its `interpreted` fixture) are skipped in the ordinary
pytest process and run by `run_kernel_tests_in_child` in a fresh pytest subprocess started with the
variable set; the rest of the session (Inductor's CUDA kernels included) never sees the switch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# triton was imported with TRITON_INTERPRET=1: its own helpers are interpreted functions.
IN_INTERPRETER = isinstance(tl.sum, InterpretedFunction)
CHILD_ENV = "DELTALEARN_EPILOGUE_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"


def require_interpreter() -> None:
    if not IN_INTERPRETER:
        pytest.skip("needs TRITON_INTERPRET=1 before triton's import: run in the subprocess")


def skip_in_child_unless_interpreted(request) -> None:
    """The subprocess exists for the kernel tests; the others ran in the parent already."""
    if IN_CHILD and "interpreted" not in request.fixturenames:
        pytest.skip("run by the parent process")


def run_kernel_tests_in_child(test_file: str, min_passed: int) -> None:
    """Run `test_file`'s kernel tests under the interpreter in a subprocess; fail on any failure or
    when fewer than `min_passed` passed (a child that skipped everything)."""
    if IN_INTERPRETER:
        pytest.skip("this process runs under the interpreter: the kernel tests ran in-process")
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_ENV: "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= min_passed, out[-6000:]
