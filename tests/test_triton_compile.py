"""Every Triton kernel compiles for a Hopper GPU (sm_90), on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs kernels as Python and misses what only the compiler
checks: a variable rebound to another type inside an `if` compiled under the interpreter and
failed on the first real GPU (2026-11-27). Here each launcher runs on CPU tensors with the kernel
launch intercepted; every launch it makes (arguments, constexprs, num_warps/num_stages) is compiled
by Triton's CUDA backend down to a cubin for sm_90 (Triton ships its own ptxas; no GPU, driver or
CUDA toolkit needed). The model shapes are the real ones (0.6B and 8B head layouts, bf16).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")

from qguard_stream.kernels import decode_ops, guard_head, paged_attention  # noqa: E402

from qguard_stream.checkpoints import config_for  # noqa: E402

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
KERNELS = (decode_ops._rms_norm_kernel, decode_ops._qk_norm_rope_store_kernel,
           decode_ops._silu_mul_kernel, paged_attention._paged_attention_kernel,
           paged_attention._combine_splits_kernel, guard_head._guard_head_kernel)


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels() -> None:
    if not all(isinstance(k, triton.runtime.jit.JITFunction) for k in KERNELS):
        pytest.skip("the kernels were imported under TRITON_INTERPRET=1")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {error}")


@contextmanager
def launches() -> Iterator[list[tuple[Any, tuple, dict]]]:
    """Record each kernel launch (kernel, args, kwargs) instead of running it."""
    seen: list[tuple[Any, tuple, dict]] = []
    for kernel in KERNELS:
        def record(*args: Any, grid: Any, warmup: bool, _kernel: Any = kernel,
                   **kwargs: Any) -> None:
            seen.append((_kernel, args, kwargs))
        kernel.run = record  # the instance attribute shadows JITFunction.run
    try:
        yield seen
    finally:
        for kernel in KERNELS:
            del kernel.run


def type_of(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"{name}: no Triton type for {type(value).__name__}")


def compile_for_hopper(kernel: Any, args: tuple, kwargs: dict) -> dict[str, str]:
    """Compile one recorded launch for sm_90; return its assembly (ttir ... cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    names = [p.name for p in kernel.params]
    bound = dict(zip(names, args, strict=False)) | kwargs
    assert set(bound) == set(names), f"{kernel.fn.__name__}: unbound {set(names) - set(bound)}"
    signature, constants = {}, {}
    for index, param in enumerate(kernel.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[(index,)] = value
        else:
            signature[param.name] = type_of(param.name, value)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm


def compile_all(run_launchers: Callable[[], None]) -> list[str]:
    """Run the launchers, compile each distinct launch; return the kernels compiled."""
    with launches() as seen:
        run_launchers()
    assert seen, "the launchers launched nothing"
    compiled, done = [], set()
    for kernel, args, kwargs in seen:
        key = (kernel.fn.__name__, tuple(type_of(str(i), a) if not isinstance(a, (int, float))
                                         or isinstance(a, bool) else a for i, a in
                                         enumerate(args)), tuple(sorted(kwargs.items())))
        if key in done:
            continue
        done.add(key)
        asm = compile_for_hopper(kernel, args, dict(kwargs))
        assert asm.get("cubin"), f"{kernel.fn.__name__}: no cubin"
        assert ".target sm_90" in asm["ptx"], f"{kernel.fn.__name__}: not built for sm_90"
        compiled.append(kernel.fn.__name__)
    return compiled


@pytest.mark.parametrize("shape", ["0.6b", "8b"])
def test_decode_ops_and_paged_attention_compile_for_sm90(shape: str) -> None:
    config = config_for(shape)
    heads, kv_heads, dim = (config.num_attention_heads, config.num_key_value_heads,
                            config.head_dim)
    dtype, page, blocks, sessions = torch.bfloat16, 16, 4, 2
    rows = sessions * 16

    def run() -> None:
        x = torch.randn(rows, config.hidden_size, dtype=dtype)
        decode_ops.rms_norm(x, torch.ones(config.hidden_size, dtype=dtype), 1e-6)
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, dtype=dtype)
        cos = torch.randn(64, dim, dtype=torch.float32)
        k_cache = torch.zeros(blocks * sessions, page, kv_heads, dim, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        q = torch.empty(rows, heads, dim, dtype=dtype)
        decode_ops.qk_norm_rope_store(
            qkv, torch.ones(heads + kv_heads, dim, dtype=dtype), cos, cos,
            torch.zeros(rows, dtype=torch.int32), torch.full((rows,), -1, dtype=torch.int32),
            q, k_cache, v_cache, 1e-6)
        decode_ops.silu_mul(torch.randn(rows, 2 * config.intermediate_size, dtype=dtype))
        tables = torch.arange(blocks * sessions, dtype=torch.int32).view(sessions, blocks)
        q_len = torch.full((sessions,), 16, dtype=torch.int32)
        q_start = torch.arange(sessions, dtype=torch.int32) * 16
        ctx = torch.full((sessions,), blocks * page, dtype=torch.int32)
        row_seq = torch.arange(rows, dtype=torch.int32) // 16
        out = torch.empty_like(q)
        for splits in (1, 4):  # one split writes `out` directly; more go through the combine
            attend = paged_attention.PagedAttention(heads, kv_heads, dim, page, rows,
                                                    torch.device("cpu"), num_splits=splits)
            for max_queries in (1, 16):
                attend(q, k_cache, v_cache, tables, q_start, q_len, ctx, row_seq, out,
                       max_queries=max_queries)

    compiled = compile_all(run)
    assert set(compiled) == {"_rms_norm_kernel", "_qk_norm_rope_store_kernel",
                             "_silu_mul_kernel", "_paged_attention_kernel",
                             "_combine_splits_kernel"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_guard_head_compiles_for_sm90(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    config = config_for("0.6b")
    inner = config.guard_inner_size
    # the launcher refuses CPU tensors outside the interpreter; here nothing runs on them
    monkeypatch.setattr(guard_head, "check_inputs", lambda *tensors: None)

    def run() -> None:
        guard_head.fused_guard_head(
            torch.randn(4, config.hidden_size, dtype=dtype),
            torch.randn(inner, config.hidden_size, dtype=dtype), torch.ones(inner, dtype=dtype),
            torch.randn(3, inner, dtype=dtype), torch.randn(9, inner, dtype=dtype), 1e-6)

    assert compile_all(run) == ["_guard_head_kernel"]
