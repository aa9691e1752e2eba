"""The demo subcommand end to end: builds its checkpoint once, streams, fires callbacks, stops."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qguard_stream import cli
from qguard_stream.cli import demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_streams_reports_transitions_and_stops_at_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "building a random demo checkpoint" in out
    assert "RANDOM WEIGHTS" in out and "MEANINGLESS" in out
    lines = out.splitlines()
    password = next(line for line in lines if "' password'" in line)
    assert "Controversial" in password and "transition Safe -> Controversial" in password
    crack = next(line for line in lines if "' crack'" in line)
    assert "transition Safe -> Unsafe" in crack and "FLAG" not in crack
    it = next(line for line in lines if "' it'" in line)
    assert "FLAG Unsafe" in it
    assert "Withheld from the user: ' offline with a wordlist." in out
    assert "' offline'" not in out  # the flagged stream stopped before the rest was scored
    cached = f"demo-{demo.DEMO_SHAPE}-{demo.DEMO_CACHE_VERSION}"
    assert (tmp_path / "qguard_stream" / cached).is_dir()


def test_demo_reuses_its_cached_checkpoint_and_completes_a_clean_response(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["demo", "--response", "Hello there."]) == 0
    capsys.readouterr()
    assert cli.main(["demo", "--response", "Hello there."]) == 0
    out = capsys.readouterr().out
    assert "building" not in out
    assert "'Hello'" in out and "' there'" in out and "response completed: no flag" in out


def test_demo_on_a_given_model_does_not_claim_rigged_weights(tiny_checkpoint, capsys):
    assert cli.main(["demo", "--model", str(tiny_checkpoint), "--response", "ok"]) == 0
    assert "RANDOM WEIGHTS" not in capsys.readouterr().out


def test_every_subcommand_is_registered_with_its_options():
    parser = cli.build_parser()
    for argv in (["serve", "--model", "m"], ["eval", "--help"], ["moderate", "--help"],
                 ["bench", "--help"]):
        try:
            parser.parse_args(argv)
        except SystemExit as done:  # --help exits 0 after printing the subcommand's options
            assert done.code == 0, argv


def test_a_subcommand_whose_module_is_missing_fails_only_when_used(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("qguard_stream.no_such_module", "gone"))
    assert cli.main(["ghost"]) == 2
    assert "'ghost' is unavailable here" in capsys.readouterr().err


def test_a_missing_subcommand_module_is_named_whatever_the_arguments(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("qguard_stream.no_such_module", "gone"))
    assert cli.main(["ghost", "--quick", "x"]) == 2
    assert "'ghost' is unavailable here" in capsys.readouterr().err


def test_bench_outside_a_checkout_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(ROOT))])
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    assert cli.main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_unknown_options_of_an_available_subcommand_are_still_refused():
    with pytest.raises(SystemExit) as done:
        cli.main(["demo", "--no-such-option"])
    assert done.value.code == 2


def model_argv(command: str, model: str, tmp_path: Path) -> list[str]:
    """`command --model MODEL` with the other options the command requires."""
    argv = [command, "--model", model]
    if command == "moderate":
        argv += ["--prompt", "hi"]
    if command == "eval":
        data = tmp_path / "data.jsonl"
        data.write_text('{"message": [{"role": "user", "content": "hi"}], "label": "Safe"}\n')
        argv += ["--input", str(data), "--output", str(tmp_path / "pred.jsonl"),
                 "--data-type", "prompt"]
    return argv


@pytest.mark.parametrize("command", ["serve", "moderate", "demo", "eval"])
def test_a_missing_checkpoint_is_one_line_not_a_traceback(tmp_path, capsys, command):
    from qguard_stream.cli import main

    assert main(model_argv(command, str(tmp_path / "missing"), tmp_path)) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["serve", "moderate", "demo", "eval"])
def test_an_unreachable_hub_id_is_one_line_saying_what_to_do_offline(tmp_path, monkeypatch,
                                                                     capsys, command):
    from huggingface_hub import constants

    from qguard_stream.cli import main

    (tmp_path / "hub").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(model_argv(command, "nobody/no-such-guard", tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "hf download nobody/no-such-guard --local-dir" in err


def test_a_malformed_vocab_json_names_the_tokenizer_files(tmp_path):
    from qguard_stream import CheckpointError, StreamGuard
    from qguard_stream.checkpoints import make_random_checkpoint

    path = make_random_checkpoint(tmp_path, "tiny", seed=1)
    (path / "vocab.json").write_text('{"a": 1, ')
    with pytest.raises(CheckpointError, match=r"tokenizer in .*vocab\.json"):
        StreamGuard.from_pretrained(path, device="cpu")
