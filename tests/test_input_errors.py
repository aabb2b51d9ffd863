"""Bad input to the ``crawlfleet`` command: one line naming what is wrong, a non-zero exit, no
traceback, nothing lost. In-process (``main([...])``); subprocess cases are in
tests/integration/test_cli_errors.py."""

from __future__ import annotations

import io
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from crawlfleet.cli.main import main
from crawlfleet.cli.seed import parse_seed_lines
from crawlfleet.common import settings as settings_module
from crawlfleet.common.connections import redact_url
from crawlfleet.common.settings import Settings, SettingsError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CRAWLFLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(settings_module, "_warned", set())


def dead_url(password: str = "hunter2") -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://:{password}@127.0.0.1:{port}/0"  # nothing listens there


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("variable", "value"), [
    ("CRAWLFLEET_CRAWL_DELAY", "nan"),
    ("CRAWLFLEET_LEASE_SECONDS", "nan"),
    ("CRAWLFLEET_FETCH_TIMEOUT", "inf"),
    ("CRAWLFLEET_RETRY_MAX", "-inf"),
    ("CRAWLFLEET_LOG_LEVEL", "loud"),
    ("CRAWLFLEET_REDIS_URL", "notaurl"),
    ("CRAWLFLEET_REDIS_URL", "http://127.0.0.1:6379/0"),
    ("CRAWLFLEET_REDIS_URL", "redis://127.0.0.1:99999/0"),
    ("CRAWLFLEET_REDIS_URL", "redis://127.0.0.1:port/0"),
    ("CRAWLFLEET_REDIS_URL", "redis://127.0.0.1/db7"),
    ("CRAWLFLEET_REDIS_URL", "redis://127.0.0.1/0?nosuchoption=1"),
    ("CRAWLFLEET_REDIS_URL", "unix://"),
    ("CRAWLFLEET_REDIS_URLS", "redis://127.0.0.1:7001/0,,redis://127.0.0.1:7002/0"),
    ("CRAWLFLEET_REDIS_URLS", "redis://127.0.0.1:7001/0,http://127.0.0.1:7002/0"),
    ("CRAWLFLEET_REDIS_URLS", "redis://127.0.0.1:7001/0,redis://127.0.0.1:7001/0"),
])
def test_a_bad_setting_is_one_line_exit_2(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["status"]) == 2
    assert variable in one_line(capsys.readouterr().err)


def test_non_finite_numbers_are_refused_in_code_too() -> None:
    with pytest.raises(SettingsError, match="CRAWLFLEET_CRAWL_DELAY"):
        Settings(crawl_delay=float("nan"))


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://:pw@h/3", "unix:///tmp/r.sock",
                                 "unix:///tmp/r.sock?db=2", "embedded://x", "redis://[::1]/0",
                                 "redis://localhost"])
def test_good_redis_urls_are_accepted(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url


def test_an_unknown_variable_is_a_warning_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRAWLFLEET_BATCHSIZE", "5")
    monkeypatch.setenv("CRAWLFLEET_REQUEST_TIMEOUT", "5")  # an old name: known
    settings = Settings.from_env()
    assert settings.batch_size == Settings().batch_size
    line = one_line(capsys.readouterr().err)
    assert "CRAWLFLEET_BATCHSIZE" in line and "CRAWLFLEET_BATCH_SIZE" in line
    assert "REQUEST_TIMEOUT" not in line


def test_redact_url() -> None:
    assert redact_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://me:hunter2@h/0") == "redis://me:***@h/0"
    assert redact_url("http://u:p%40ss@proxy:3128") == "http://u:***@proxy:3128"
    assert "hunter2" not in redact_url("unix:///tmp/r.sock?password=hunter2&db=1")
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("unix:///tmp/r.sock") == "unix:///tmp/r.sock"


def test_settings_repr_and_errors_hide_the_password() -> None:
    settings = Settings(redis_url="redis://:hunter2@h:6379/0")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    with pytest.raises(SettingsError) as caught:
        Settings(redis_url="redis://:hunter2@h:bad/0")
    assert "hunter2" not in str(caught.value)


def test_log_lines_never_carry_a_url_password(capsys: pytest.CaptureFixture[str]) -> None:
    from crawlfleet.common.logs import configure_logging, get_logger

    configure_logging("json", "info")
    get_logger("t").warning("x", url="redis://:hunter2@h/0", nested={"p": ["http://u:pw@p/"]})
    import logging

    logging.getLogger("arq").warning("connecting to redis://:hunter2@h/0")
    err = capsys.readouterr().err
    assert "hunter2" not in err and ":pw@" not in err and ":***@h/0" in err


@pytest.mark.parametrize("command", [["status"], ["check"], ["seed", "http://a.test/"],
                                     ["export", "--out", "-"]])
def test_redis_down_is_one_line_exit_1_without_the_password(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = dead_url()
    assert main([*command, "--redis-url", url]) == 1
    line = one_line(capsys.readouterr().err.replace("enqueued", "\n"))
    assert "unreachable" in line and "redis://:***@127.0.0.1:" in line and "hunter2" not in line


def test_a_failed_export_leaves_the_previous_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text("previous\n")
    assert main(["export", "--out", str(out), "--redis-url", dead_url()]) == 1
    assert out.read_text() == "previous\n"
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


@pytest.mark.parametrize("command", [
    ["export", "--redis-url", "embedded://io", "--out", "/nonexistent/dir/x.jsonl"],
    ["crawl", "http://a.test/", "--out", "/nonexistent/dir/x.jsonl"],
    ["seed", "--redis-url", "embedded://io", "--file", "/nonexistent/seeds.txt"],
])
def test_files_that_cannot_be_used_are_named(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(command) == 2
    line = one_line(capsys.readouterr().err)
    assert "/nonexistent/" in line and "No such file or directory" in line


def test_export_writes_its_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.jsonl"
    assert main(["export", "--redis-url", "embedded://io2", "--out", str(out)]) == 0
    assert out.exists() and list(tmp_path.iterdir()) == [out]


def test_seed_file_bytes_are_decoded_per_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    seeds = tmp_path / "seeds.txt"
    seeds.write_bytes(b"\xef\xbb\xbfhttp://a.test/\nhttp://b.test/caf\xe9\nhttp://c.test/\n")
    assert main(["seed", "--redis-url", "embedded://seedbytes", "--file", str(seeds)]) == 1
    err = capsys.readouterr().err
    assert "line 1" not in err  # the BOM is dropped
    assert f"{seeds} line 2: not UTF-8" in err
    assert "enqueued 2 seed(s), refused 1" in err


def test_parse_seed_lines_reports_bad_bytes_and_drops_a_bom() -> None:
    seeds, errors = parse_seed_lines([b"\xef\xbb\xbfhttp://a.test/", b"http://b.test/\xff"])
    assert seeds == ["http://a.test/"]
    assert [(e.line, "UTF-8" in e.reason) for e in errors] == [(2, True)]


def test_a_lone_dash_reads_stdin(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    stdin: Any = io.TextIOWrapper(io.BytesIO(b"http://a.test/\nhttp://b.test/\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["seed", "--redis-url", "embedded://dash", "-"]) == 0
    assert "enqueued 2 seed(s), refused 0" in capsys.readouterr().err


def test_a_long_url_is_shortened_in_its_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = "http://a.test/" + "x" * 5000
    assert main(["seed", "--redis-url", "embedded://long", url]) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "argument 1" in line)
    assert len(line) < 200 and "…" in line and "5014 characters" in line


def test_crawl_summary_hides_the_password() -> None:
    from crawlfleet.cli.crawl import format_summary

    summary = {"pages": 1, "failed": 0, "skipped": 0, "seen": 1, "discarded_scope": 0,
               "elapsed_s": 1.0, "finished": True, "exported": 1}
    text = format_summary(summary, Settings(redis_url="redis://:hunter2@h/0"), 1, "x")
    assert "hunter2" not in text and "redis://:***@h/0" in text


def test_crawl_refuses_a_shard_list_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRAWLFLEET_REDIS_URLS", f"{dead_url('pw1')},{dead_url('pw2')}")
    assert main(["crawl", "http://a.test/"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "CRAWLFLEET_REDIS_URLS" in line and "pw1" not in line and "pw2" not in line


def test_a_shard_that_cannot_be_reached_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRAWLFLEET_REDIS_URLS", f"{dead_url('pw1')},{dead_url('pw2')}")
    assert main(["status"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "unreachable" in line and "pw1" not in line and "pw2" not in line
