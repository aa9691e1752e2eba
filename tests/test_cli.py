"""The demo subcommand end to end: builds its checkpoint once, streams, says weights are random."""

from __future__ import annotations

from qguard_stream import cli


def test_demo_builds_checkpoint_once_and_streams_every_token(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.main(["demo", "--prompt", "hi", "--response", "Hello there."]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "MEANINGLESS" in out
    assert "building a random demo checkpoint" in out
    assert "'Hello'" in out and "' there'" in out and "'<|im_end|>'" in out
    assert (tmp_path / "qguard_stream" / f"demo-{cli.DEMO_SHAPE}-{cli.DEMO_CACHE_VERSION}").is_dir()
    assert cli.main(["demo", "--prompt", "hi", "--response", "Hello."]) == 0
    assert "building" not in capsys.readouterr().out


def test_demo_on_a_given_model_does_not_claim_random_weights(tiny_checkpoint, capsys):
    assert cli.main(["demo", "--model", str(tiny_checkpoint), "--response", "ok"]) == 0
    assert "RANDOM WEIGHTS" not in capsys.readouterr().out
