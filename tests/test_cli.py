"""The demo subcommand end to end: builds its checkpoint once, streams, fires callbacks, stops."""

from __future__ import annotations

from qguard_stream import cli


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
    assert (tmp_path / "qguard_stream" / f"demo-{cli.DEMO_SHAPE}-{cli.DEMO_CACHE_VERSION}").is_dir()


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
