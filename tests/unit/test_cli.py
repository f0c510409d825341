"""The CLI through click's runner: report, filters, errors (one line, non-zero, no traceback)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tcptrace_bpf.cli import cli

from .recordings import record
from .streams import client_active_close, server_passive_close


def write(tmp_path, text, name="r.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_report_text_and_json(tmp_path):
    path = write(tmp_path, record(client_active_close() + server_passive_close(t0=5), end=20))
    result = CliRunner().invoke(cli, ["report", path])
    assert result.exit_code == 0, result.output
    assert "Time in state" in result.output and "CLOSE_WAIT" in result.output
    result = CliRunner().invoke(cli, ["report", path, "--json"])
    data = json.loads(result.output)
    assert data["connections"] == 3 and data["close"] == {"active": 1, "passive": 1, "open": 1}


def test_report_filters(tmp_path):
    path = write(tmp_path, record(client_active_close() + server_passive_close(t0=5), end=20))
    data = json.loads(CliRunner().invoke(cli, ["report", path, "--json", "--comm", "curl"]).output)
    assert data["connections"] == 1 and data["close"] == {"active": 1}
    data = json.loads(CliRunner().invoke(cli, ["report", path, "--json", "--lport", "80", "-4"]).output)
    assert data["connections"] == 2


def test_bad_line_is_one_line_error(tmp_path):
    text = record(client_active_close(), end=10)
    lines = text.splitlines(keepends=True)
    lines.insert(3, "garbage\n")
    path = write(tmp_path, "".join(lines))
    result = CliRunner().invoke(cli, ["report", path])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {path}:4: not JSON (Expecting value)"
    assert "Traceback" not in result.output


def test_missing_file_and_binary_file(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "cannot read" in result.output
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    result = CliRunner().invoke(cli, ["report", str(path)])
    assert result.exit_code == 1 and "not UTF-8" in result.output and "Traceback" not in result.output


def test_filter_values_are_validated(tmp_path):
    path = write(tmp_path, record(client_active_close(), end=10))
    for args in (["--port", "70000"], ["--port", "80; system()"], ["--addr", "not-an-ip"], ["--pid", "-3"],
                 ["-4", "-6"]):
        result = CliRunner().invoke(cli, ["report", path, *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_torn_last_line_tolerated(tmp_path):
    path = write(tmp_path, record(client_active_close(), end=10, footer=False) + '{"type": "trans')
    result = CliRunner().invoke(cli, ["report", path])
    assert result.exit_code == 0 and "is torn" in result.output


def test_record_to_unwritable_path(monkeypatch):
    from tcptrace_bpf import cli as cli_module

    monkeypatch.setattr(cli_module, "_run_tracer", lambda sinks_for, flt, duration: sinks_for({}))
    result = CliRunner().invoke(cli, ["record", "--output", "/proc/nope/x.jsonl", "--duration", "0"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: cannot write /proc/nope/x.jsonl: No such file or directory"


def test_live_replay_without_root_or_bcc(tmp_path):
    path = write(tmp_path, record(client_active_close() + server_passive_close(t0=5), end=20))
    result = CliRunner().invoke(cli, ["live", "--replay", path, "--speed", "0", "--duration", "0.3"])
    assert result.exit_code == 0, result.output
    assert "stopped (duration)" in result.output and "lost 0" in result.output


def test_live_replay_bad_recording(tmp_path):
    path = write(tmp_path, '{"type": "header", "schema": 1}\nnot json\n')
    result = CliRunner().invoke(cli, ["live", "--replay", path, "--speed", "0", "--duration", "0.3"])
    assert result.exit_code == 1 and f"{path}:2: not JSON" in result.output and "Traceback" not in result.output


def test_live_replay_and_record_exclude_each_other(tmp_path):
    path = write(tmp_path, record(client_active_close(), end=20))
    result = CliRunner().invoke(cli, ["live", "--replay", path, "--record", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_live_replay_bad_line_mid_file(tmp_path):
    lines = record(client_active_close(), end=20).splitlines(keepends=True)
    lines.insert(4, "{broken\n")
    path = write(tmp_path, "".join(lines))
    result = CliRunner().invoke(cli, ["live", "--replay", path, "--speed", "0", "--duration", "2"])
    assert result.exit_code == 1 and f"{path}:5: not JSON" in result.output and "Traceback" not in result.output
