"""README.md runs as written: every ```python block is run as a program, and every ```bash block
marked to run is run by bash, each in a fresh directory, on the CPU, from the source tree.

A directive in an HTML comment on the line before a block says how it runs:
  <!-- readme-test: skip: REASON -->  not run here (a GPU, the network, a long-running server);
                                      the reason is reported
  <!-- readme-test: run -->           a bash block that runs as pasted
  <!-- readme-test: server -->        needs `qguard-stream serve ... --api-key KEY` on
                                      127.0.0.1:8000: the test serves a random checkpoint with that
                                      key on a free port and points the block at it
  <!-- readme-test: proxy -->         needs `qguard-stream proxy` on 127.0.0.1:8000 in front of an
                                      LLM: the test runs one over a fake OpenAI-compatible upstream
  <!-- readme-test: gen -->           needs `qguard-stream serve` of a Gen checkpoint on
                                      127.0.0.1:8000: the test serves a random one
Python blocks run unless skipped; a bash block without a directive fails the test, so each shell
command is decided on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.fake_upstream import FakeUpstream, Loopback
from qguard_stream import StreamGuard
from qguard_stream.checkpoints import make_random_checkpoint, make_random_gen_checkpoint
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.proxy.app import create_proxy_app
from qguard_stream.server import create_app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!-- readme-test: (skip: .+|run|server|proxy|gen) -->$")
BLOCK_TIMEOUT_S = 240
ADDRESS = "127.0.0.1:8000"


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    directive: str | None

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.language}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the directive on the line before each."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        start, body = index, []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        previous = next((lines[i].strip() for i in range(start - 1, -1, -1)
                         if lines[i].strip()), "")
        directive = DIRECTIVE.match(previous)
        blocks.append(Block(start + 1, match.group(1), "\n".join(body) + "\n",
                            directive.group(1) if directive else None))
        index += 1
    return blocks


BLOCKS = [block for block in readme_blocks(README.read_text())
          if block.language in ("python", "bash")]


def test_the_block_parser_reads_languages_bodies_and_directives() -> None:
    text = ("Intro\n\n<!-- readme-test: skip: needs a GPU -->\n```python\nprint(1)\n```\n"
            "```bash\necho hi\n```\n\n<!-- readme-test: run -->\n\n```bash\nls\n```\n")
    assert readme_blocks(text) == [Block(4, "python", "print(1)\n", "skip: needs a GPU"),
                                   Block(7, "bash", "echo hi\n", None),
                                   Block(13, "bash", "ls\n", "run")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("readme"), "tiny", seed=3)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[Loopback]:
    engine = Engine(StreamGuard.from_pretrained(checkpoint, device="cpu"),
                    EngineSettings(max_tokens=8192))
    served = Loopback(create_app(engine, api_key="KEY"))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def proxy(checkpoint: Path) -> Iterator[Loopback]:
    upstream = FakeUpstream()
    engine = Engine(StreamGuard.from_pretrained(checkpoint, device="cpu"),
                    EngineSettings(max_tokens=8192))
    served = Loopback(create_proxy_app(engine, f"{upstream.loop.url}/v1", api_key="KEY"))
    yield served
    served.stop()
    upstream.loop.stop()


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Iterator[Loopback]:
    from qguard_stream.gen.guard import GenGuard
    from qguard_stream.server.chat import create_gen_app

    path = make_random_gen_checkpoint(tmp_path_factory.mktemp("readme-gen"), "tiny")
    served = Loopback(create_gen_app(GenGuard.from_pretrained(path, device="cpu"),
                                     "Qwen/Qwen3Guard-Gen-0.6B"))
    yield served
    served.stop()


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block_runs(block: Block, request: pytest.FixtureRequest,
                           tmp_path: Path) -> None:
    if block.directive is None and block.language == "bash":
        pytest.fail(f"{block.id}: a bash block needs a directive (run, server, proxy, gen or "
                    f"skip)")
    if block.directive is not None and block.directive.startswith("skip: "):
        pytest.skip(block.directive[len("skip: "):])
    code = block.code
    if block.directive in ("server", "proxy", "gen"):
        served = request.getfixturevalue(block.directive)
        code = code.replace(ADDRESS, served.url.removeprefix("http://"))
    command = ([sys.executable, "-c", code] if block.language == "python"
               else ["bash", "-euo", "pipefail", "-c", code])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, (f"{block.id} failed ({done.returncode}):\n{code}\n--- stdout\n"
                                  f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
