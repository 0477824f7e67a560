"""Settings: one frozen object built once from flags, env and the config file."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit

from alertd.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

QUEUE_TYPES = ("quorum", "classic")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
PROBERS = ("ffprobe", "pyav")
# Settings fields whose config-file key and option are singular (repeatable).
DISPLAY_KEYS = {"allow_networks": "allow_network", "webhook_secrets": "webhook_secret"}
# RabbitMQ's expiry timers are Erlang timers, 2^32-1 ms at most: a delay queue
# with a longer x-message-ttl is declared (3.10 takes up to 2^53) but nothing
# assures that its messages ever come back. Also past any sane retry.
MAX_TTL_MS = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a master or child needs; passed explicitly, never read from globals."""

    workers: int = 1
    concurrency: int = 8
    # (MIN, MAX) children when the master sizes the fleet from the queue; None = off.
    autoscale: tuple[int, int] | None = None
    autoscale_interval: float = 5.0
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    queue: str = "alerts"
    queue_type: str = "quorum"
    delivery_limit: int = 20
    dsn: str = "postgresql://postgres@127.0.0.1:5432/alertd"
    db_pool_size: int = 4
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    allow_networks: tuple[IPNetwork, ...] = ()
    max_download_bytes: int = 256 * 1024 * 1024
    download_timeout: float = 60.0
    connect_timeout: float = 10.0
    download_dir: str | None = None
    prober: str = "pyav"
    probe_timeout: float = 30.0
    probe_helpers: int = 2
    max_attempts: int = 5
    retry_delay: float = 5.0
    graceful_timeout: float = 30.0
    webhook_url: str | None = None
    webhook_secrets: tuple[bytes, ...] = ()
    webhook_timeout: float = 10.0
    webhook_max_attempts: int = 30
    heartbeat_timeout: float = 30.0
    max_alerts_per_child: int = 0
    max_memory_per_child: int = 0
    pidfile: str | None = None
    log_level: str = "info"
    log_format: str = "text"

    def retry_delay_for(self, attempt: int) -> float:
        """Delay before attempt ``attempt + 1``: retry_delay x 2^(attempt-1)."""
        return float(self.retry_delay * 2 ** max(0, attempt - 1))

    def masked(self) -> dict[str, Any]:
        """The effective settings for display, with every secret masked."""
        shown: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "webhook_secrets":
                value = [f"whsec_*** ({len(value)} set)"] if value else []
            elif f.name in ("amqp_url", "dsn"):
                value = mask_url(value)
            elif f.name == "webhook_url" and value is not None:
                value = mask_url(value, every_query_value=True)
            elif f.name == "allow_networks":
                value = [str(n) for n in value]
            elif f.name == "autoscale" and value is not None:
                value = f"{value[0]},{value[1]}"
            # Shown under the key the config file and the option use.
            shown[DISPLAY_KEYS.get(f.name, f.name)] = value
        return shown


def validate(settings: Settings) -> Settings:
    """Check ranges and cross-field rules; raise ConfigError naming the key."""
    s = settings
    _at_least("workers", s.workers, 1)
    _at_least("concurrency", s.concurrency, 1)
    _at_most("concurrency", s.concurrency, 65535)
    _at_least("max_download_bytes", s.max_download_bytes, 1)
    _at_least("max_attempts", s.max_attempts, 1)
    _at_least("webhook_max_attempts", s.webhook_max_attempts, 1)
    _at_least("delivery_limit", s.delivery_limit, 2)
    _at_least("db_pool_size", s.db_pool_size, 1)
    _at_least("probe_helpers", s.probe_helpers, 1)
    _at_most("probe_helpers", s.probe_helpers, 64)
    if s.autoscale is not None:
        low, high = s.autoscale
        if not 1 <= low <= high:
            raise ConfigError(f"autoscale: must be MIN,MAX with 1 <= MIN <= MAX, "
                              f"got {low},{high}")
    for key in ("download_timeout", "connect_timeout", "probe_timeout", "webhook_timeout",
                "heartbeat_timeout", "retry_delay", "autoscale_interval", "graceful_timeout"):
        # nan and inf pass every comparison a deadline is built from (a nan
        # graceful timeout never ends a stop): refused by name.
        if not math.isfinite(getattr(s, key)):
            raise ConfigError(f"{key}: must be a finite number of seconds, got {getattr(s, key)}")
        if not getattr(s, key) > 0 and key != "graceful_timeout":
            raise ConfigError(f"{key}: must be greater than 0, got {getattr(s, key)}")
    if s.graceful_timeout < 0:
        raise ConfigError(f"graceful_timeout: must be 0 or more, got {s.graceful_timeout}")
    try:
        longest = s.retry_delay_for(s.max_attempts - 1)
    except OverflowError:
        longest = math.inf
    if s.max_attempts > 1 and longest * 1000 > MAX_TTL_MS:
        raise ConfigError(f"max_attempts: with retry_delay {s.retry_delay:g}s the last retry "
                          f"would wait {longest:.0f}s, past RabbitMQ's longest timer "
                          f"({MAX_TTL_MS // 1000}s, ~49.7 days); lower max_attempts or "
                          "retry_delay")
    if not 0 <= s.metrics_port <= 65535:
        raise ConfigError(f"metrics_port: must be 0..65535, got {s.metrics_port}")
    _one_of("queue_type", s.queue_type, QUEUE_TYPES)
    _one_of("log_level", s.log_level, LOG_LEVELS)
    _one_of("log_format", s.log_format, LOG_FORMATS)
    _one_of("prober", s.prober, PROBERS)
    # In bytes: AMQP names are at most 255 bytes of UTF-8, and the longest
    # one alertd declares is "<queue>.retry.<up to 10 digits>ms".
    if not s.queue or len(s.queue.encode("utf-8", "surrogatepass")) > 200:
        raise ConfigError("queue: must be 1..200 bytes of UTF-8")
    if urlsplit(s.amqp_url).scheme not in ("amqp", "amqps"):
        raise ConfigError(f"amqp_url: scheme must be amqp or amqps, got {mask_url(s.amqp_url)!r}")
    if urlsplit(s.dsn).scheme not in ("postgresql", "postgres"):
        raise ConfigError("dsn: must be a postgresql:// URL")
    _parses_as_conninfo(s.dsn)
    if s.webhook_url is not None:
        parts = urlsplit(s.webhook_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("webhook_url: must be an http(s) URL, got "
                              f"{mask_url(s.webhook_url, every_query_value=True)!r}")
    return s


def check_local_paths(settings: Settings) -> Settings:
    """What only the machine that runs alertd can check: called by ``start`` (and
    on a reload), not by ``check-config``, which may vet a config elsewhere (CI,
    a laptop; systemd creates CacheDirectory= only when the unit starts)."""
    if settings.download_dir is not None:
        _writable_directory("download_dir", settings.download_dir)
    return settings


def _writable_directory(key: str, path: str) -> None:
    """Refuse at start what every child would otherwise crash on, one by one."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: {path!r} is not an existing directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path!r} is not writable by this user")


def environment_without_settings() -> dict[str, str]:
    """This process's environment without the ``ALERTD_*`` settings, for a
    process that parses hostile input (ffprobe, the PyAV helper): it needs
    neither the webhook secret nor the DSN or broker URL."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ALERTD_")}


def _parses_as_conninfo(dsn: str) -> None:
    """libpq must be able to read the DSN; its error is not shown, as it may quote
    the password (a raw ``%`` in it): the pool would log that on every retry."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except (ProgrammingError, UnicodeError):
        # Not even masked: a password with a raw / # or ? defeats URL parsing.
        raise ConfigError("dsn: libpq cannot parse it: percent-encode special characters "
                          "of the user name and password (% as %25, / as %2F, @ as %40, "
                          "# as %23, ? as %3F)") from None


def parse_networks(values: Any) -> tuple[IPNetwork, ...]:
    if isinstance(values, str):
        values = [values]
    nets = []
    for value in values or ():
        try:
            nets.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"allow_network: {value!r} is not a CIDR network") from None
    return tuple(nets)


def parse_autoscale(value: Any) -> tuple[int, int] | None:
    """``"MIN,MAX"`` (flag, env or file) as a pair of ints; empty or None means off."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    low, sep, high = str(value).partition(",")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ConfigError(f"autoscale: must be MIN,MAX (e.g. 1,4), got {value!r}") from None


def parse_webhook_secrets(value: str | Sequence[str] | None) -> tuple[bytes, ...]:
    """Decode ``whsec_<base64>`` secrets, in rotation order: several, space separated
    (env or file), or a list of them (file), one secret per item."""
    if not value:
        return ()
    if isinstance(value, str):
        tokens = value.split()
    elif all(len(item.split()) == 1 for item in value):
        tokens = [item.strip() for item in value]
    else:
        raise ConfigError("webhook_secret: a list holds one secret per item")
    keys = []
    for token in tokens:
        if not token.startswith("whsec_"):
            raise ConfigError("webhook_secret: each secret must start with 'whsec_'")
        try:
            key = base64.b64decode(token.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("webhook_secret: the part after 'whsec_' is not base64") from None
        if len(key) < 16:
            raise ConfigError("webhook_secret: a secret must decode to at least 16 bytes")
        keys.append(key)
    return tuple(keys)


def load_config_file(path: str, known_keys: set[str]) -> dict[str, Any]:
    """Read a TOML config file into option values; unknown keys are refused."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for raw_key, value in doc.items():
        key = raw_key.replace("-", "_")
        if key not in known_keys:
            raise ConfigError(f"{raw_key}: unknown key in {path}")
        values[key] = value
    return values


def from_options(options: Mapping[str, Any], *,
                 webhook_secret: str | Sequence[str] | None) -> Settings:
    """Build validated Settings from click's resolved option values."""
    known = {f.name for f in fields(Settings)}
    values = {k: v for k, v in options.items() if k in known and v is not None}
    if "allow_networks" in options:
        values["allow_networks"] = parse_networks(options["allow_networks"])
    values["webhook_secrets"] = parse_webhook_secrets(webhook_secret)
    values["autoscale"] = parse_autoscale(options.get("autoscale"))
    settings = validate(replace(Settings(), **values))
    if settings.autoscale is not None:
        # --workers is where an autoscaled fleet starts, inside its bounds.
        low, high = settings.autoscale
        settings = replace(settings, workers=min(high, max(low, settings.workers)))
    return settings


_SECRET_PARAM = re.compile(
    r"(pass|passwd|password|secret|token|key|sig|signature|auth|credentials?)$", re.IGNORECASE)


def mask_url(url: str, *, every_query_value: bool = False) -> str:
    """The URL with ``***`` for its password and for query values that look
    secret (``password=``, ``token=``...; all of them with ``every_query_value``,
    for a webhook URL whose token may be called anything), to log or print."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "***"
    # The parts are replaced in the text, not put back together: urlunsplit
    # would rewrite some URLs (postgresql:///db?host=/run/postgresql).
    masked = url
    if password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        masked = masked.replace(f"//{parts.netloc}", f"//{parts.username or ''}:***@{host}", 1)
    if parts.query:
        pairs = [pair.partition("=") for pair in parts.query.split("&")]
        query = "&".join(
            f"{key}{eq}***" if eq and (every_query_value or _SECRET_PARAM.search(key))
            else f"{key}{eq}{value}" for key, eq, value in pairs)
        masked = masked.replace(f"?{parts.query}", f"?{query}", 1)
    if parts.fragment and every_query_value:
        masked = masked[:masked.rindex("#") + 1] + "***"
    return masked


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be at least {low}, got {value}")


def _at_most(key: str, value: int, high: int) -> None:
    if value > high:
        raise ConfigError(f"{key}: must be at most {high}, got {value}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
