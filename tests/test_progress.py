"""Progress output: bars on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from femurseg.core import progress as P


def test_lines_in_a_log(monkeypatch):
    monkeypatch.delenv(P.ENV_FORCE, raising=False)
    log = io.StringIO()
    items = list(P.progress(range(5), desc="synth mr", unit="case", file=log))
    assert items == [0, 1, 2, 3, 4]
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") == 1 and text.startswith("synth mr: 5/5 case in ")


def test_transient_bars_are_silent_and_slow_work_reports(monkeypatch):
    log = io.StringIO()
    assert list(P.progress([1, 2], desc="check", leave=False, file=log)) == [1, 2]
    assert log.getvalue() == ""
    monkeypatch.setattr(P, "LOG_INTERVAL_S", 0.0)
    with P.progress(total=3, desc="folds", unit="fold", file=log) as bar:
        bar.update(1)
        bar.set_postfix(loss="0.5")
        bar.update(2)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("folds: 1/3 fold") and lines[-1].startswith("folds: 3/3 fold in")
    assert lines[-1].endswith("loss=0.5")


def test_terminal_gets_tqdm(monkeypatch):
    monkeypatch.setenv(P.ENV_FORCE, "bar")
    assert type(P.progress(range(2), file=io.StringIO())).__name__ == "tqdm"
    monkeypatch.setenv(P.ENV_FORCE, "lines")
    assert isinstance(P.progress(range(2)), P.LineProgress)
    assert type(P.progress(range(2), disable=True)).__name__ == "tqdm"
