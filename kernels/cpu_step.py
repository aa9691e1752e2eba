"""Build and load cpu_step.c (the CPU decode step's non-GEMM work) as a ctypes library.

The library is compiled once per machine, on first use, with the system C compiler (`$CC`, else
`cc`/`gcc`), into the user cache (`$XDG_CACHE_HOME/qguard_stream/cpu_step/`), keyed by the
source, the flags, the compiler and the CPU's feature flags (it is built with -march=native).
Without a compiler, or if the build fails, `load()` returns None and the caller runs the eager
PyTorch step; set QGUARD_STREAM_CPU_KERNEL=0 to never use it. This module owns the build and the C
signatures, not the step (qguard_stream/runtime/cpu_step.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_step.c")
DISABLE_ENV = "QGUARD_STREAM_CPU_KERNEL"
BASE_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-pthread", "-shared", "-fPIC")
# Tried in order: the first that compiles is used. OpenMP only for its `simd` pragmas (the
# threads are the library's own pool), so no OpenMP runtime is linked.
FLAG_SETS = (("-march=native", "-fopenmp-simd"), ("-march=native",), ())

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "qg_exp": ([_P, _P, _I], None),
    "qg_set_threads": ([_I], None),
    "qg_bf16_dot": ([], _I),
    "qg_set_adaptive": ([_I], None),
    "qg_pool_state": ([_P], None),
    "qg_usable_helpers": ([_I, _I, _I], _I),
    "qg_threads_with_room": ([_I], _I),
    "qg_gemm": ([_P, _P, _P, _P, _I, _I, _I], None),
    "qg_gemm_bf16": ([_P, _P, _P, _P, _I, _I, _I], None),
    "qg_rms_norm": ([_P, _P, _P, _I, _I, _F], None),
    "qg_qk_rope_store": ([_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _I], None),
    "qg_attend_paged": ([_P, _P, _P, _P, _I, _I, _P, _P, _P, _I, _I, _I, _I, _P, _I],
                        ctypes.c_int),
    "qg_silu_mul": ([_P, _P, _I, _I], None),
    "qg_guard_head": ([_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _I], None),
    "qg_decode_layer": ([_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _P, _I, _I, _I,
                         _I, _I, _F, _P, _I], ctypes.c_int),
}


class BuildError(RuntimeError):
    """The C compiler is missing or rejected cpu_step.c."""


@functools.cache
def load(defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library with its signatures declared, or None (disabled, or no build).
    `defines`: extra -D flags for a variant build (tests: "-DQG_BF16_DOT_EMULATED")."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        log.info("%s=0: the CPU decode step runs in eager PyTorch", DISABLE_ENV)
        return None
    try:
        library = ctypes.CDLL(str(build(defines=defines)))
    except (BuildError, OSError) as error:
        log.warning("the C CPU decode step is unavailable (%s); using the eager PyTorch step, "
                    "which is slower per token", error)
        return None
    for name, (argtypes, restype) in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype
    return library


def build(cache: Path | None = None, defines: tuple[str, ...] = ()) -> Path:
    """Compile cpu_step.c into `cache` (default: the user cache) unless already built, with the
    extra `defines` (-D flags) if any; return the shared library's path. Raises BuildError naming
    the compiler and its complaint."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BuildError("no C compiler found (set CC, or install gcc)")
    cache = cache or _cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        flags = (*flags, *defines)
        target = cache / f"cpu_step-{_build_key(compiler, flags)}.so"
        if target.is_file():
            return target
        try:
            _compile(compiler, flags, target)
            return target
        except BuildError as error:
            errors.append(str(error))
    raise BuildError("; ".join(errors))


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    # Compile beside the target and rename: concurrent builders never see a half-written file.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    command = [compiler, *BASE_FLAGS, *flags, str(SOURCE), "-o", partial, "-lm"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        os.unlink(partial)
        raise BuildError(f"{' '.join(command)}: {error}") from None
    if result.returncode != 0:
        os.unlink(partial)
        complaint = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise BuildError(f"{' '.join(command)}: {complaint[0]}")
    os.replace(partial, target)


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (compiler, *BASE_FLAGS, *flags, platform.machine(), _cpu_flags()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds are only valid where these match)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qguard_stream" / "cpu_step"


def pointer(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> int:
    """A contiguous CPU tensor's address, for passing to the library (fp32 unless `dtype` says
    otherwise: the paged metadata is int32)."""
    if tensor.device.type != "cpu" or tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"the C step takes contiguous {dtype} CPU tensors, got {tensor.dtype} "
                         f"on {tensor.device}, contiguous={tensor.is_contiguous()}")
    return tensor.data_ptr()
