"""A fake OpenAI-compatible upstream (and a loopback uvicorn runner) for the proxy's tests and
benchmark: streams a chosen text in chosen delta sizes, optionally paced, can fail mid-stream or
answer an error status, counts the requests it received (and the keys they carried) and times
when it sent each text delta. Loopback only."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

CLEAN = "Mix flour and water — knead ten minutes; 日本語 café 👩‍👧, then bake."


class Loopback:
    """An ASGI app served by uvicorn on 127.0.0.1 (an ephemeral port, or `port`) in a background
    thread."""

    def __init__(self, app, port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class FakeUpstream:
    """An OpenAI-compatible chat server streaming `text` in deltas of `sizes` characters
    (cycled), counting requests; `fail_after` deltas it drops the stream; `status` errors."""

    def __init__(self) -> None:
        self.text, self.sizes, self.fail_after, self.status = CLEAN, [3], None, 200
        self.pause = 0.0  # seconds between chunks
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.sent_chunks = 0
        self.sent_at: list[float] = []  # perf_counter() as each text delta of the latest stream
        # was sent
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": "fake", "object": "model",
                                                "created": 0, "owned_by": "tests"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            self.authorizations.append(request.headers.get("authorization"))
            if self.status != 200:
                return JSONResponse({"error": {"message": "upstream says no", "type": "x",
                                               "param": None, "code": "nope"}},
                                    status_code=self.status)
            n = body.get("n", 1)
            if not body.get("stream"):
                return {"id": "c1", "object": "chat.completion", "created": 1,
                        "model": body["model"], "choices": [
                            {"index": i, "message": {"role": "assistant", "content": self.text},
                             "finish_reason": "stop"} for i in range(n)],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 5,
                                  "total_tokens": 8}}
            return StreamingResponse(self.stream(body, n), media_type="text/event-stream")

        self.loop = Loopback(app)

    def reset(self) -> None:
        """Back to a clean, immediate, successful stream of CLEAN, with no requests seen."""
        self.text, self.sizes, self.fail_after, self.status = CLEAN, [3], None, 200
        self.pause = 0.0
        self.requests.clear()
        self.authorizations.clear()
        self.sent_chunks = 0

    def deltas(self) -> list[str]:
        out, at, i = [], 0, 0
        while at < len(self.text):
            size = self.sizes[i % len(self.sizes)]
            out.append(self.text[at:at + size])
            at, i = at + size, i + 1
        return out

    async def stream(self, body: dict, n: int):
        def chunk(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk",
                                          "created": 1, "model": body["model"],
                                          "choices": choices, **extra}) + "\n\n"

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None} for i in range(n)])
        self.sent_at = []
        for number, delta in enumerate(self.deltas()):
            if self.fail_after is not None and number >= self.fail_after:
                raise RuntimeError("upstream died mid-stream")
            self.sent_chunks += 1
            self.sent_at.append(time.perf_counter())
            yield chunk([{"index": i, "delta": {"content": delta}, "finish_reason": None}
                         for i in range(n)])
            await asyncio.sleep(self.pause)
        yield chunk([{"index": i, "delta": {}, "finish_reason": "stop"} for i in range(n)])
        if (body.get("stream_options") or {}).get("include_usage"):
            yield chunk([], usage={"prompt_tokens": 3, "completion_tokens": 5,
                                   "total_tokens": 8})
        yield "data: [DONE]\n\n"
