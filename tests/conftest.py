"""Shared fixtures: small random checkpoints in the real on-disk format, built once per run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qguard_stream import StreamGuard
from qguard_stream.checkpoints import make_random_checkpoint

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'tiny' fp32 checkpoint (single file) with the real Qwen3 tokenizer."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_guard(tiny_checkpoint: Path) -> StreamGuard:
    """The tiny checkpoint loaded on CPU in fp32 (shared: tests must close what they open)."""
    return StreamGuard.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny_guard: StreamGuard):
    return tiny_guard.tokenizer


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (tiny matmuls run faster without thread handoffs);
    use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def upstream() -> Iterator[object]:
    """A fake OpenAI-compatible LLM on loopback (benchmarks/fake_upstream.py), per module; modules
    using it reset it before each test (`upstream.reset()`)."""
    from benchmarks.fake_upstream import FakeUpstream  # the server extra, needed only here

    fake = FakeUpstream()
    yield fake
    fake.loop.stop()
