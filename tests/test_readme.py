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
command is decided on. A skipped bash block's `qguard-stream ...` commands are still parsed by the
real CLI parser (a renamed or removed flag fails), and the benchmark's `qguard-stream bench
--quick` runs as `--smoke --no-plot`. A block whose output is deterministic shows it in comment
lines `# prints: TEXT`; each TEXT must appear in what the block prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qguard_stream import StreamGuard
from qguard_stream.checkpoints import make_random_checkpoint, make_random_gen_checkpoint
from qguard_stream.cli import build_parser
from qguard_stream.engine import Engine, EngineSettings

if TYPE_CHECKING:  # the server extra's; imported by the fixtures that serve
    from benchmarks.fake_upstream import Loopback

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!-- readme-test: (skip: .+|run|server|proxy|gen) -->$")
PRINTS = re.compile(r"^\s*# prints: (.+?)\s*$", re.MULTILINE)
BLOCK_TIMEOUT_S = 240
ADDRESS = "127.0.0.1:8000"
SHELL_OPERATORS = ("&&", "||", ";", "|", "&")
# what a served block needs installed: the server extra, and openai for the OpenAI clients
SERVED_NEEDS = {"server": ("fastapi", "uvicorn", "httpx", "websockets"),
                "proxy": ("fastapi", "uvicorn", "httpx", "openai"),
                "gen": ("fastapi", "uvicorn", "httpx", "openai")}


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


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block as words: continuation lines joined, comments dropped,
    split at control operators, a redirection and what follows it dropped (close enough to bash
    for the README's commands)."""
    commands: list[list[str]] = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for word in lexer:
            if word in SHELL_OPERATORS:
                commands.append(words)
                words = []
            else:
                words.append(word)
        commands.append(words)
    return [command[:_redirection(command)] for command in commands if command]


def _redirection(words: list[str]) -> int:
    return next((i for i, word in enumerate(words) if set(word) <= set("<>")), len(words))


def cli_commands(code: str) -> list[list[str]]:
    """The arguments of each `qguard-stream ...` command of a bash block."""
    return [words[1:] for words in shell_commands(code) if words[0] == "qguard-stream"]


def expected_output(code: str) -> list[str]:
    """The TEXTs of a block's `# prints: TEXT` comment lines."""
    return PRINTS.findall(code)


BLOCKS = [block for block in readme_blocks(README.read_text())
          if block.language in ("python", "bash")]


def test_the_block_parser_reads_languages_bodies_and_directives() -> None:
    text = ("Intro\n\n<!-- readme-test: skip: needs a GPU -->\n```python\nprint(1)\n```\n"
            "```bash\necho hi\n```\n\n<!-- readme-test: run -->\n\n```bash\nls\n```\n")
    assert readme_blocks(text) == [Block(4, "python", "print(1)\n", "skip: needs a GPU"),
                                   Block(7, "bash", "echo hi\n", None),
                                   Block(13, "bash", "ls\n", "run")]


def test_shell_commands_join_lines_drop_comments_and_split_at_operators() -> None:
    code = ('pip install -e ".[server]" && qguard-stream serve --model m \\\n'
            '    --port 8000   # or --api-key KEY\nprintf x > data.jsonl; qguard-stream demo\n')
    assert shell_commands(code) == [["pip", "install", "-e", ".[server]"],
                                    ["qguard-stream", "serve", "--model", "m", "--port", "8000"],
                                    ["printf", "x"], ["qguard-stream", "demo"]]
    assert cli_commands(code) == [["serve", "--model", "m", "--port", "8000"], ["demo"]]


def test_a_renamed_flag_fails_to_parse() -> None:
    parse_cli(["serve", "--model", "m", "--kv-memory-gb", "2"])
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --kv-gb"):
        parse_cli(["serve", "--model", "m", "--kv-gb", "2"])


def test_prints_comments_are_the_expected_output() -> None:
    code = "print(1)  # not this one\n# prints: 1\nx = 2\n    # prints: ['a', 'b'] \n"
    assert expected_output(code) == ["1", "['a', 'b']"]


def parse_cli(arguments: list[str]) -> None:
    """Parse `qguard-stream ARGUMENTS` with the real parser, running nothing."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            build_parser().parse_args(arguments)
        except SystemExit:
            pytest.fail(f"`qguard-stream {shlex.join(arguments)}` does not parse:\n"
                        f"{errors.getvalue()}")


def readme_env() -> dict[str, str]:
    """The environment blocks run in: offline, this checkout importable, this venv's commands."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("readme"), "tiny", seed=3)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[Loopback]:
    from benchmarks.fake_upstream import Loopback
    from qguard_stream.server import create_app

    engine = Engine(StreamGuard.from_pretrained(checkpoint, device="cpu"),
                    EngineSettings(max_tokens=8192))
    served = Loopback(create_app(engine, api_key="KEY"))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def proxy(checkpoint: Path) -> Iterator[Loopback]:
    from benchmarks.fake_upstream import FakeUpstream, Loopback
    from qguard_stream.proxy.app import create_proxy_app

    upstream = FakeUpstream()
    engine = Engine(StreamGuard.from_pretrained(checkpoint, device="cpu"),
                    EngineSettings(max_tokens=8192))
    served = Loopback(create_proxy_app(engine, f"{upstream.loop.url}/v1", api_key="KEY"))
    yield served
    served.stop()
    upstream.loop.stop()


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Iterator[Loopback]:
    from benchmarks.fake_upstream import Loopback
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
        parsed = cli_commands(block.code) if block.language == "bash" else []
        for arguments in parsed:
            parse_cli(arguments)
        pytest.skip(block.directive[len("skip: "):]
                    + (f" [{len(parsed)} qguard-stream command(s) parsed]" if parsed else ""))
    code = block.code
    if block.directive in SERVED_NEEDS:
        for module in SERVED_NEEDS[block.directive]:
            pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[server]' "
                                               f"(and openai for the OpenAI clients)")
        served = request.getfixturevalue(block.directive)
        code = code.replace(ADDRESS, served.url.removeprefix("http://"))
    command = ([sys.executable, "-c", code] if block.language == "python"
               else ["bash", "-euo", "pipefail", "-c", code])
    done = subprocess.run(command, cwd=tmp_path, env=readme_env(), capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, (f"{block.id} failed ({done.returncode}):\n{code}\n--- stdout\n"
                                  f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
    for text in expected_output(block.code):
        assert text in done.stdout, (f"{block.id}: the README says it prints {text!r}; it "
                                     f"printed:\n{done.stdout[-3000:]}")


def test_the_readme_benchmark_runs_in_smoke_mode(tmp_path: Path) -> None:
    """`qguard-stream bench --quick` times for minutes, so its block is skipped; the same command
    with --smoke (a tiny grid) and --no-plot runs here, from outside the checkout as in CI."""
    quick = [arguments for block in BLOCKS if block.language == "bash"
             for arguments in cli_commands(block.code)
             if arguments[:1] == ["bench"] and "--quick" in arguments]
    assert quick, "README.md has no `qguard-stream bench --quick` command"
    for arguments in quick:
        smoke = [("--smoke" if word == "--quick" else word) for word in arguments]
        done = subprocess.run(["qguard-stream", *smoke, "--no-plot"], cwd=tmp_path,
                              env=readme_env(), capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
        assert done.returncode == 0, (f"qguard-stream {shlex.join(smoke)} --no-plot failed:\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        assert list((tmp_path / "benchmarks" / "out").glob("latency_*.json"))
