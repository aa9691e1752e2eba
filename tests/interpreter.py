"""Running Triton kernels under TRITON_INTERPRET=1 from a test (test-only helper).

Interpreter mode must be on before triton is first imported (triton's own helpers are jit
functions too), so the kernels run in one subprocess per test module: inputs go in through a
torch.save file, outputs come back the same way, and interpreter mode never leaks into the other
tests.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import qguard_stream


def interpreter_breaks_on_numpy() -> bool:
    """Triton's interpreter up to 3.6 turns a runtime scalar into a loop bound with
    int(ndarray of shape [1]), which numpy >= 2.4 refuses (triton-lang/triton#9171): kernels with
    runtime loop bounds then fail under the interpreter though the compiled kernels are fine."""
    import numpy
    from triton.runtime import interpreter

    numpy_major_minor = tuple(int(part) for part in numpy.__version__.split(".")[:2])
    return numpy_major_minor >= (2, 4) and \
        "int(self.handle.data))" in inspect.getsource(interpreter)


def run_interpreted(worker: str, inputs: Any, folder: Path, timeout: float = 600) -> Any:
    """Run `worker` (Python source reading sys.argv[1], writing sys.argv[2]) with `inputs` in a
    TRITON_INTERPRET=1 subprocess; return what it saved. Skips when the interpreter cannot run."""
    import triton

    if interpreter_breaks_on_numpy():
        pytest.skip(f"triton {triton.__version__}'s interpreter fails with numpy >= 2.4 "
                    f"(triton-lang/triton#9171)")
    torch.save(inputs, folder / "inputs.pt")
    source_root = str(Path(qguard_stream.__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join([source_root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", worker, folder / "inputs.pt", folder / "outputs.pt"],
                   env=env, check=True, timeout=timeout)
    return torch.load(folder / "outputs.pt")
