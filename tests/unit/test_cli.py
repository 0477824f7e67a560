"""The settings contract: names, precedence flag > env > file > default, one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from alertd.config import mask_url, parse_webhook_secrets

ALERTD = str(Path(sys.executable).with_name("alertd"))
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_cm90YXRpb24tc2VjcmV0LW51bWJlci10d28h"


def alertd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ALERTD_")}
    return subprocess.run([ALERTD, *args], env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=30, check=False)


def effective(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = alertd("check-config", *args, env=env)
    assert done.returncode == 0, done.stderr
    doc: dict[str, object] = orjson.loads(done.stdout)
    return doc


def test_defaults_are_the_documented_ones() -> None:
    doc = effective()
    assert doc["workers"] == 1 and doc["concurrency"] == 8 and doc["queue"] == "alerts"
    assert doc["queue_type"] == "quorum" and doc["metrics_port"] == 0


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    conf = tmp_path / "alertd.toml"
    conf.write_text('workers = 3\nconcurrency = 5\nqueue = "from-file"\n'
                    'allow_network = ["127.0.0.1/32"]\n')
    doc = effective("--config", str(conf), "--workers", "7",
                    env={"ALERTD_WORKERS": "6", "ALERTD_CONCURRENCY": "9"})
    assert doc["workers"] == 7          # flag over env and file
    assert doc["concurrency"] == 9      # env over file
    assert doc["queue"] == "from-file"  # file over default
    assert doc["allow_network"] == ["127.0.0.1/32"]


def test_the_config_file_can_come_from_env(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("max_attempts = 9\n")
    assert effective(env={"ALERTD_CONFIG": str(conf)})["max_attempts"] == 9


def test_repeatable_allow_network_from_env_is_space_separated() -> None:
    doc = effective(env={"ALERTD_ALLOW_NETWORK": "127.0.0.1/32 ::1/128"})
    assert doc["allow_network"] == ["127.0.0.1/32", "::1/128"]


@pytest.mark.parametrize(("args", "env", "names"), [
    (["--workers", "0"], {}, "--workers"),
    (["--concurrency", "lots"], {}, "--concurrency"),
    ([], {"ALERTD_METRICS_PORT": "70000"}, "ALERTD_METRICS_PORT"),
    (["--queue-type", "stream"], {}, "--queue-type"),
    (["--retry-delay", "0"], {}, "retry_delay"),
    (["--amqp-url", "http://x"], {}, "amqp_url"),
    (["--dsn", "mysql://x"], {}, "dsn"),
    (["--allow-network", "not-a-cidr"], {}, "allow_network"),
    (["--webhook-url", "ftp://x"], {}, "webhook_url"),
    ([], {"ALERTD_WEBHOOK_SECRET": "plain-text"}, "webhook_secret"),
    ([], {"ALERTD_WEBHOOK_SECRET": "whsec_%%%"}, "webhook_secret"),
    # nan/inf pass every "> 0" check; a nan graceful timeout never ends a stop.
    (["--graceful-timeout", "nan"], {}, "graceful_timeout"),
    (["--download-timeout", "inf"], {}, "download_timeout"),
    ([], {"ALERTD_RETRY_DELAY": "nan"}, "retry_delay"),
    # The longest delay queue would need a TTL RabbitMQ refuses (> 2^32-1 ms).
    (["--max-attempts", "25"], {}, "max_attempts"),
    # 130 characters but 260 bytes: AMQP names are at most 255 bytes.
    (["--queue", "\u00e9" * 130], {}, "queue"),
    # Past a float: a one-line refusal, not an OverflowError traceback.
    (["--max-attempts", "1100"], {}, "max_attempts"),
])
def test_a_bad_value_is_refused_with_one_line_naming_it(
    args: list[str], env: dict[str, str], names: str,
) -> None:
    done = alertd("check-config", *args, env=env)
    assert done.returncode in (2, 3)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert names in lines[0]


def test_an_unknown_key_in_the_config_file_is_refused_by_name(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("workers = 2\nwrokers = 3\n")
    done = alertd("check-config", "--config", str(conf))
    assert done.returncode == 3
    assert done.stderr.strip() == f"alertd: config error: wrokers: unknown key in {conf}"


def test_a_config_file_that_is_not_toml_is_refused_in_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("workers = = 2\n")
    done = alertd("check-config", "--config", str(conf))
    assert done.returncode == 3 and len(done.stderr.strip().splitlines()) == 1


def test_secrets_are_masked_in_check_config(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'webhook_secret = "{SECRET}"\n')
    done = alertd("check-config", "--config", str(conf),
                  "--amqp-url", "amqp://u:hunter2@127.0.0.1/v",
                  "--dsn", "postgresql://u:pgpass@127.0.0.1/db?sslmode=require&password=pgq",
                  "--webhook-url", "https://hook:hookpw@hooks.test/in?t=tok3n")
    assert done.returncode == 0, done.stderr
    for secret in (SECRET.removeprefix("whsec_"), "hunter2", "pgpass", "pgq", "hookpw", "tok3n"):
        assert secret not in done.stdout
    doc = orjson.loads(done.stdout)
    assert doc["webhook_secret"] == ["whsec_*** (1 set)"]
    assert doc["amqp_url"] == "amqp://u:***@127.0.0.1/v"
    assert doc["dsn"] == "postgresql://u:***@127.0.0.1/db?sslmode=require&password=***"
    assert doc["webhook_url"] == "https://hook:***@hooks.test/in?t=***"


def test_masking_a_url_changes_nothing_but_the_secrets() -> None:
    assert mask_url("postgresql:///db?host=/run/postgresql&password=pw") == \
        "postgresql:///db?host=/run/postgresql&password=***"
    assert mask_url("amqp://guest:guest@127.0.0.1:5672/v?heartbeat=10") == \
        "amqp://guest:***@127.0.0.1:5672/v?heartbeat=10"
    assert mask_url("https://h.test/in?t=1#tok=2", every_query_value=True) == \
        "https://h.test/in?t=***#***"


def test_a_refused_webhook_url_is_named_without_its_secrets() -> None:
    done = alertd("check-config", "--webhook-url", "ftp://u:hookpw@hooks.test/in?t=tok3n")
    assert done.returncode == 3
    assert done.stderr.strip() == ("alertd: config error: webhook_url: must be an http(s) URL, "
                                   "got 'ftp://u:***@hooks.test/in?t=***'")


@pytest.mark.parametrize("password", ["Zq%9xSecretPw", "pa/ss%w0rd", "pa#ss%w0rd"])
def test_a_dsn_libpq_cannot_parse_is_refused_without_showing_its_password(
    password: str,
) -> None:
    # A raw % in the password: the pool would log libpq's error, which quotes it;
    # with a raw / or # too, URL parsing cannot even find the password to mask.
    done = alertd("check-config", "--dsn", f"postgresql://alertd:{password}@127.0.0.1/db")
    assert done.returncode == 3
    assert password not in done.stderr + done.stdout
    assert done.stderr.startswith("alertd: config error: dsn: libpq cannot parse it: "
                                  "percent-encode"), done.stderr


def test_the_webhook_secret_cannot_be_given_as_a_flag() -> None:
    done = alertd("check-config", "--webhook-secret", SECRET)
    assert done.returncode == 2
    assert "--webhook-secret" in done.stderr


def test_start_help_documents_signals_and_exit_codes() -> None:
    done = alertd("start", "--help")
    assert done.returncode == 0
    for word in ("TERM", "QUIT", "HUP", "TTIN", "USR1", "Exit codes", "ALERTD_CONCURRENCY"):
        assert word in done.stdout


@pytest.mark.parametrize(("line", "key"), [
    ("workers = 0", "workers"), ('queue_type = "stream"', "queue_type"),
    ('concurrency = "many"', "concurrency"), ("metrics_port = 70000", "metrics_port"),
])
def test_a_bad_value_in_the_config_file_is_refused_naming_the_file_key(
    tmp_path: Path, line: str, key: str,
) -> None:
    refusal_of(tmp_path, line, key)


def refusal_of(tmp_path: Path, line: str, key: str) -> str:
    """check-config of a file holding ``line``: exit 3 and one line naming ``key`` and the file."""
    conf = tmp_path / "bad.toml"
    conf.write_text(line + "\n")
    done = alertd("check-config", "--config", str(conf))
    assert done.returncode == 3, done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alertd: config error: {key}: "), lines
    assert str(conf) in lines[0]
    return lines[0]


def test_one_config_file_serves_every_command(tmp_path: Path) -> None:
    conf = Path(__file__).resolve().parents[2] / "conf" / "alertd.toml"
    for command in (["publish"], ["db", "migrate"], ["dlq", "list"], ["outbox", "list"],
                    ["status"], ["check-config"]):
        done = alertd(*command, "--help", env={"ALERTD_CONFIG": str(conf)})
        assert done.returncode == 0, (command, done.stderr)


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_start_refuses_a_download_dir_it_cannot_use_in_one_line_and_check_config_does_not(
    tmp_path: Path, kind: str,
) -> None:
    # Every child would crash on it, one after the other, instead. check-config
    # may vet a config on another machine (CI; systemd makes CacheDirectory= at
    # start), so only start, which runs where the directory must be, checks it.
    path = tmp_path / "no-such-dir" if kind == "missing" else tmp_path / "f"
    if kind == "a file":
        path.write_text("")
    done = alertd("start", "--download-dir", str(path), "--control-socket", "",
                  "--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2F")
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alertd: config error: download_dir: "), lines
    assert effective("--download-dir", str(path))["download_dir"] == str(path)
    assert effective("--download-dir", str(tmp_path))["download_dir"] == str(tmp_path)


def test_the_longest_retry_delay_rabbitmq_accepts_is_taken() -> None:
    # 5 s x 2^19 = 2,621,440 s: the 20th delay queue's TTL still fits in 2^32-1 ms.
    assert effective("--max-attempts", "21")["max_attempts"] == 21


def test_webhook_secrets_in_the_config_file_may_be_a_list_kept_in_rotation_order(
    tmp_path: Path,
) -> None:
    # A list is how TOML writes two secrets (allow_network takes one too);
    # before, it ended check-config and start in an AttributeError traceback.
    conf = tmp_path / "c.toml"
    conf.write_text(f'webhook_secret = ["{SECRET}", "{OLD_SECRET}"]\n')
    done = alertd("check-config", "--config", str(conf))
    assert done.returncode == 0, done.stderr
    assert SECRET.removeprefix("whsec_") not in done.stdout
    assert OLD_SECRET.removeprefix("whsec_") not in done.stdout
    assert orjson.loads(done.stdout)["webhook_secret"] == ["whsec_*** (2 set)"]
    # The same keys, in the same order, as the space-separated string.
    listed = parse_webhook_secrets([SECRET, OLD_SECRET])
    assert listed == parse_webhook_secrets(f"{SECRET} {OLD_SECRET}")
    assert listed == parse_webhook_secrets([SECRET]) + parse_webhook_secrets([OLD_SECRET])
    # ALERTD_WEBHOOK_SECRET still wins over the file.
    doc = effective("--config", str(conf), env={"ALERTD_WEBHOOK_SECRET": SECRET})
    assert doc["webhook_secret"] == ["whsec_*** (1 set)"]


@pytest.mark.parametrize("value", [
    "5", "true", "[5]", f'["{SECRET}", 5]', f'[["{SECRET}"]]', f'{{ key = "{SECRET}" }}',
    f'["{SECRET} {OLD_SECRET}"]',
])
def test_a_webhook_secret_of_another_type_in_the_config_file_is_refused_in_one_line(
    tmp_path: Path, value: str,
) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f"webhook_secret = {value}\n")
    done = alertd("check-config", "--config", str(conf))
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alertd: config error: webhook_secret: ")
    assert SECRET.removeprefix("whsec_") not in done.stderr


def test_an_empty_alertd_control_socket_turns_the_socket_off_as_the_flag_and_file_do(
    tmp_path: Path,
) -> None:
    # README: '' = off for --control-socket and ALERTD_CONTROL_SOCKET; click
    # reads an empty variable as unset, so an env file could not turn it off.
    conf = tmp_path / "c.toml"
    conf.write_text('control_socket = "/run/from-file.sock"\n')
    off = {"ALERTD_CONTROL_SOCKET": ""}
    assert effective(env=off)["control_socket"] == ""
    assert effective("--config", str(conf), env=off)["control_socket"] == ""
    assert effective("--control-socket", "/run/flag.sock", env=off)["control_socket"] == \
        "/run/flag.sock"
    assert effective("--config", str(conf))["control_socket"] == "/run/from-file.sock"
    # alertd status reads the same variable: off is said so, not asked of a default path.
    done = alertd("status", env=off)
    assert done.returncode == 1
    assert done.stderr.strip() == ("alertd: error: control_socket is '' (off): no master "
                                   "answers 'alertd status'; give --control-socket PATH")


@pytest.mark.parametrize(("line", "key"), [
    ("workers = 2.5", "workers"), ("max_download_bytes = 1.9", "max_download_bytes"),
    ("workers = true", "workers"), ("workers = inf", "workers"),
    ("delivery_limit = 1e-3", "delivery_limit"), ("download_timeout = true", "download_timeout"),
    ("queue = 5", "queue"), ("control_socket = 0", "control_socket"),
    ("workers = { n = 2 }", "workers"), ("retry_delay = [5]", "retry_delay"),
    ("probe_timeout = 1979-05-27", "probe_timeout"),
    ("allow_network = 5", "allow_network"), ('allow_network = ["::1/128", 5]', "allow_network"),
])
def test_a_config_file_value_of_the_wrong_toml_type_is_refused_not_truncated(
    tmp_path: Path, line: str, key: str,
) -> None:
    # click converts what it is given with int()/float()/str(): before, 2.5
    # ran 2 children, true 1, and a table or a date was a TypeError traceback.
    assert refusal_of(tmp_path, line, key).startswith(f"alertd: config error: {key}: must be ")


def test_a_fractional_count_is_refused_and_one_with_no_fraction_is_taken(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("workers = 2.5\n")
    done = alertd("check-config", "--config", str(conf))
    assert done.stderr.strip() == ("alertd: config error: workers: must be an integer, got "
                                   f"2.5, a float (refused, not truncated) (in {conf})")
    # Files that ran before the type checks keep running: 2.0 is 2, 1.5e8 bytes exact.
    conf.write_text("workers = 2.0\nmax_memory_per_child = 1.5e8\n")
    doc = effective("--config", str(conf))
    assert doc["workers"] == 2 and doc["max_memory_per_child"] == 150_000_000


def test_a_config_file_value_a_flag_could_spell_is_taken(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('download_timeout = 5\nworkers = "3"\nretry_delay = "2.5"\n'
                    'allow_network = "10.0.0.0/8"\nwebhook_secret = []\n')
    doc = effective("--config", str(conf))
    assert doc["download_timeout"] == 5.0 and doc["workers"] == 3 and doc["retry_delay"] == 2.5
    assert doc["allow_network"] == ["10.0.0.0/8"] and doc["webhook_secret"] == []
