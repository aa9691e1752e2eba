"""Shared fixtures: small random checkpoints in the real on-disk format, built once per run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


class GuardBreaker:
    """An ASGI wrapper of a guard server: while `after` is set, each WebSocket opened is closed
    (code 1011) in place of its reply number `after` + 1, and the server's later messages on it
    are dropped. A guard that fails mid-stream, the same way every time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.after: int | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        after = self.after
        if scope["type"] != "websocket" or after is None:
            await self.app(scope, receive, send)
            return
        replies = 0

        async def breaking_send(message: dict) -> None:
            nonlocal replies
            if message["type"] == "websocket.send":
                replies += 1
                if replies == after + 1:
                    await send({"type": "websocket.close", "code": 1011})
            if replies <= after:
                await send(message)

        await self.app(scope, receive, breaking_send)


@pytest.fixture(scope="module")
def breaking_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A guard server (`qguard-stream serve`'s app; Unsafe exactly at " bomb" and " fuse") behind
    a GuardBreaker, on loopback: `.url`, `.engine`, `.breaker` (set `.breaker.after`)."""
    from benchmarks.fake_upstream import Loopback
    from qguard_stream.checkpoints import make_trigger_checkpoint
    from qguard_stream.engine import Engine, EngineSettings
    from qguard_stream.server import create_app

    path = make_trigger_checkpoint(tmp_path_factory.mktemp("breaking"), [12764, 31702])
    engine = Engine(StreamGuard.from_pretrained(path, device="cpu"),
                    EngineSettings(max_tokens=65536))
    breaker = GuardBreaker(create_app(engine))
    served = Loopback(breaker)
    served.engine, served.breaker = engine, breaker
    yield served
    served.stop()
