"""Off a terminal the bar is not drawn; a plain line every PLAIN_EVERY_S seconds
shows the epoch's progress in a log file, and changes no result."""
import json
import re

from gpucnn.app import train
from gpucnn.app.cli import main

RUN = ["train", "--limit", "128", "--epochs", "2", "--batch-size", "32", "--device", "cpu"]
LINE = re.compile(r"^epoch [12]/2: step [123]/4 \(\d+%\), loss \d+\.\d{4}, \d+ images/s, "
                  r"\d+s left$")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_log_file_gets_plain_progress_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "PLAIN_EVERY_S", 0)  # a line after every step but the last
    assert main(RUN + ["--out", str(tmp_path / "lines")]) == 0  # stderr is not a terminal
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if " left" in line]
    assert len(lines) == 6 and all(LINE.match(line) for line in lines), lines
    assert "\r" not in captured.err  # and no bar
    assert main(RUN + ["--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert " left" not in capsys.readouterr().out
    lines_rows, quiet_rows = _rows(tmp_path / "lines"), _rows(tmp_path / "quiet")
    for row in lines_rows + quiet_rows:
        row.pop("images_per_s"), row.pop("elapsed_s")
    assert lines_rows == quiet_rows  # reading the loss more often changes no bit


def test_no_line_before_the_interval(tmp_path, capsys):
    assert main(RUN + ["--out", str(tmp_path / "run")]) == 0
    assert " left" not in capsys.readouterr().out
