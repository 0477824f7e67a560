"""The ``alertd`` command line: start, check-config, db migrate, publish, status."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click
import orjson

from alertd import __version__
from alertd.config import DISPLAY_KEYS, Settings, check_local_paths, from_options, load_config_file
from alertd.errors import AlertdError, ConfigError
from alertd.exitcodes import EXIT_CONFIG, EXIT_CRASH, EXIT_USAGE
from alertd.filevalues import wrong_secrets_type, wrong_type

SIGNALS_HELP = """
\b
Signals (to the master):
  TERM, INT  graceful: stop intake, finish in-flight alerts within
             --graceful-timeout, requeue the rest, exit 0; a second one
             stops fast
  QUIT       fast: children exit now; unacked alerts are redelivered
  HUP        reload the config file; replace children one by one
  TTIN/TTOU  one child more / fewer (the removed one drains first;
             within MIN..MAX with --autoscale)
  USR1       reopen logs
\b
Exit codes: 0 stopped cleanly, 1 crashed (also when the metrics
port, control socket or pidfile cannot be set up), 2 bad usage,
3 bad configuration (also when a child refuses it at boot).
"""

_D = Settings()
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _opt(name: str, *decls: str, **kwargs: Any) -> Decorator:
    """An option settable as ``--name``, env ``ALERTD_NAME`` and ``name`` in the file."""
    env = "ALERTD_" + name.upper().replace("-", "_")
    kwargs.setdefault("show_default", True)
    kwargs.setdefault("show_envvar", True)
    return click.option(f"--{name}", *decls, envvar=env, **kwargs)


class EmptyEnvIsOff(click.Option):
    """An option whose environment variable set to '' means '' (documented as
    off), as ``--name ''`` and ``name = ""`` in the file do; click reads an empty
    variable as unset, which would let the file or the default win instead."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        value = super().resolve_envvar_value(ctx)
        if value is None and isinstance(self.envvar, str) and os.environ.get(self.envvar) == "":
            return ""
        return value


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager --config: the file's values become click's default_map (below env and flags).

    One file serves every command: a key another command uses (``workers``
    for ``alertd publish``) is accepted and left alone; a key no command
    knows is refused, and so is a value of the wrong type, naming its key.
    """
    if not value:
        return None
    values = load_config_file(value, file_keys())
    secrets = values.pop("webhook_secret", None)
    if secrets is not None and (why := wrong_secrets_type(secrets)):
        raise ConfigError(f"webhook_secret: {why} (in {value})")
    ctx.meta["webhook_secret_from_file"] = secrets
    if "allow_network" in values:
        values["allow_networks"] = values.pop("allow_network")
    if isinstance(values.get("allow_networks"), str):
        values["allow_networks"] = [values["allow_networks"]]
    params = {p.name: p for p in ctx.command.params if p.name}
    mine = {}
    for key, raw in values.items():
        if key not in params:
            continue
        name = DISPLAY_KEYS.get(key, key)
        if why := wrong_type(params[key], raw):
            raise ConfigError(f"{name}: {why} (in {value})")
        try:
            params[key].type_cast_value(ctx, raw)
        except click.BadParameter as exc:
            raise ConfigError(f"{name}: {exc.message} (in {value})") from None
        mine[key] = raw
    ctx.default_map = {**(ctx.default_map or {}), **mine}
    return value


def file_keys() -> set[str]:
    """Every key the config file may hold: the daemon's options and its secret."""
    keys = {p.name for p in start.params if p.name and p.name != "config"}
    return keys | {"webhook_secret", "allow_network"}


config_option = click.option(
    "--config", envvar="ALERTD_CONFIG", is_eager=True, expose_value=False,
    callback=_load_config, type=click.Path(dir_okay=False),
    help="TOML file of option values (keys as option names, e.g. amqp_url = \"...\").",
    show_envvar=True)

DAEMON_OPTIONS: list[Decorator] = [
    config_option,
    _opt("workers", type=click.IntRange(1), default=_D.workers,
         help="Children forked by the master."),
    _opt("concurrency", type=click.IntRange(1, 65535), default=_D.concurrency,
         help="CONCURRENT_TASKS: slots per child, also its AMQP prefetch."),
    _opt("autoscale", metavar="MIN,MAX", default=None,
         help="Size the fleet from the queue: grow to MAX children while the backlog "
              "outruns the free slots, shrink (gracefully) to MIN when idle. --workers "
              "is then the starting count, clamped into MIN..MAX."),
    _opt("autoscale-interval", type=click.FloatRange(0.1), default=_D.autoscale_interval,
         help="Seconds between queue samples with --autoscale; the grow, idle and "
              "cooldown windows are counted in samples, so they scale with it."),
    _opt("amqp-url", default=_D.amqp_url, help="Broker URL; the vhost is the URL's path."),
    _opt("queue", default=_D.queue, help="Queue to consume; DLQ is <queue>.dlq."),
    _opt("queue-type", type=click.Choice(["quorum", "classic"]), default=_D.queue_type,
         help="Type of the queues alertd declares."),
    delivery_limit_option := _opt(
        "delivery-limit", type=click.IntRange(2), default=_D.delivery_limit,
        help="Quorum queues: deliveries before the broker dead-letters a message."),
    _opt("dsn", default=_D.dsn, help="PostgreSQL connection URL."),
    _opt("db-pool-size", type=click.IntRange(1), default=_D.db_pool_size,
         help="Database connections per child."),
    _opt("metrics-host", default=_D.metrics_host, help="Address for --metrics-port."),
    _opt("metrics-port", type=click.IntRange(0, 65535), default=_D.metrics_port,
         help="Serve /metrics, /healthz, /readyz here (0 = off)."),
    _opt("control-socket", cls=EmptyEnvIsOff, default="/tmp/alertd.sock",
         help="Unix socket the master answers 'alertd status' on ('' = off)."),
    _opt("allow-network", "allow_networks", multiple=True, default=(),
         help="CIDR that clips and webhooks may reach although private or loopback "
              "(repeatable; env: space separated)."),
    _opt("max-download-bytes", type=click.IntRange(1), default=_D.max_download_bytes,
         help="Largest clip accepted."),
    _opt("download-timeout", type=float, default=_D.download_timeout,
         help="Seconds for a whole download."),
    _opt("connect-timeout", type=float, default=_D.connect_timeout,
         help="Seconds to connect (HTTP and AMQP)."),
    _opt("download-dir", default=None, help="Where temp files go: an existing directory "
         "alertd can write (default: system temp)."),
    _opt("prober", type=click.Choice(["pyav", "ffprobe"]), default=_D.prober,
         help="Metadata extractor: pyav (libav in a pool of helper processes) or ffprobe "
              "(a process per probe)."),
    _opt("probe-helpers", type=click.IntRange(1, 64), default=_D.probe_helpers,
         help="PyAV helper processes per child (with --prober pyav)."),
    _opt("probe-timeout", type=float, default=_D.probe_timeout,
         help="Seconds before a probe is killed."),
    _opt("max-attempts", type=click.IntRange(1), default=_D.max_attempts,
         help="Tries of an alert on transient errors before it is recorded failed; the "
              "longest retry delay must fit RabbitMQ's longest timer (~49.7 days)."),
    _opt("retry-delay", type=float, default=_D.retry_delay,
         help="Seconds before the 2nd attempt; doubles for each next one."),
    _opt("graceful-timeout", type=float, default=_D.graceful_timeout,
         help="Seconds to finish in-flight alerts on TERM."),
    _opt("webhook-url", default=None, help="Webhook for alerts that name none."),
    _opt("webhook-timeout", type=float, default=_D.webhook_timeout,
         help="Seconds per webhook attempt."),
    _opt("webhook-max-attempts", type=click.IntRange(1), default=_D.webhook_max_attempts,
         help="Webhook attempts before the outbox row is marked failed."),
    _opt("heartbeat-timeout", type=float, default=_D.heartbeat_timeout,
         help="Seconds without a heartbeat before a child is killed as hung."),
    _opt("max-alerts-per-child", type=click.IntRange(0), default=_D.max_alerts_per_child,
         help="Recycle a child after about this many alerts (0 = never)."),
    _opt("max-memory-per-child", type=click.IntRange(0), default=_D.max_memory_per_child,
         help="Recycle a child above this RSS in bytes (0 = never)."),
    _opt("pidfile", default=None, help="Write the master's pid here."),
    _opt("log-level", type=click.Choice(["debug", "info", "warning", "error"]),
         default=_D.log_level),
    _opt("log-format", type=click.Choice(["text", "json"]), default=_D.log_format),
]


def _all_of(decorators: list[Decorator]) -> Decorator:
    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorate in reversed(decorators):
            func = decorate(func)
        return func
    return apply


daemon_options = _all_of(DAEMON_OPTIONS)


def settings_from(ctx: click.Context, options: dict[str, Any]) -> Settings:
    secret = os.environ.get("ALERTD_WEBHOOK_SECRET") or ctx.meta.get("webhook_secret_from_file")
    return from_options(options, webhook_secret=secret)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="alertd")
def cli() -> None:
    """alertd: RabbitMQ video alerts -> probed, stored (PostgreSQL) and delivered (webhooks).

    Secrets never go on the command line: the webhook secret comes from
    ALERTD_WEBHOOK_SECRET or webhook_secret in the config file
    ("whsec_<base64>"; several while rotating: space separated, or in
    the file a list, one secret per item).
    """


@cli.command(epilog=SIGNALS_HELP)
@daemon_options
@click.pass_context
def start(ctx: click.Context, /, control_socket: str, **options: Any) -> None:
    """Run the master and its children until TERM/INT."""
    from alertd.logs import setup_logging
    from alertd.master import Arbiter

    settings = check_local_paths(settings_from(ctx, options))
    setup_logging(settings.log_level, settings.log_format)
    args = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "start" else []

    def reload() -> Settings:
        # Re-resolve flags, env and the config file exactly as at start.
        with start.make_context("start", list(args)) as again:
            params = dict(again.params)
            params.pop("control_socket", None)
            return check_local_paths(settings_from(again, params))

    code = Arbiter(settings, reload=reload, control_socket=control_socket or None).run()
    sys.exit(code)


@cli.command("check-config")
@daemon_options
@click.pass_context
def check_config(ctx: click.Context, /, control_socket: str, **options: Any) -> None:
    """Validate the settings and print them, secrets masked."""
    settings = settings_from(ctx, options)
    shown = {**settings.masked(), "control_socket": control_socket}
    click.echo(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())


@cli.group()
def db() -> None:
    """Database schema and retention."""


@db.command()
@config_option
@_opt("dsn", default=_D.dsn, help="PostgreSQL connection URL.")
def migrate(dsn: str) -> None:
    """Create or upgrade the schema (idempotent, safe to run concurrently)."""
    from alertd.adapters.postgres import migrate as run_migrations

    version = run_migrations(dsn)
    click.echo(f"schema at version {version}")


@db.command("prune")
@config_option
@_opt("dsn", default=_D.dsn, help="PostgreSQL connection URL.")
@click.option("--older-than", "days", type=click.FloatRange(1), required=True,
              help="Days since an alert's outcome was decided (at least 1).")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def db_prune(dsn: str, days: float, dry_run: bool, yes: bool) -> None:
    """Delete alerts older than --older-than days whose webhook is settled.

    Their outbox rows and attempts go with them; an alert whose webhook is
    still pending is kept. A pruned alert id is no longer a duplicate: a
    message with that id arriving later is processed again (and its webhook
    sent again), so keep more days than any redelivery or replay can take.
    """
    from alertd.operations import prune

    if not dry_run and not yes:
        click.confirm(f"Delete alerts settled more than {days:g} days ago?", abort=True)
    count = prune(dsn, days * 86400, dry_run=dry_run)
    click.echo(f"{count} alerts {'would be' if dry_run else 'were'} deleted")


@cli.command()
@config_option
@_opt("amqp-url", default=_D.amqp_url, help="Broker URL.")
@_opt("queue", default=_D.queue, help="Queue to publish to.")
@_opt("queue-type", type=click.Choice(["quorum", "classic"]), default=_D.queue_type)
@delivery_limit_option
@click.option("--file", "-f", "path", type=click.File("rb"),
              help="JSON-lines file of alerts ('-' for stdin).")
@click.argument("alerts", nargs=-1)
def publish(*, amqp_url: str, queue: str, queue_type: str, delivery_limit: int, path: Any,
            alerts: tuple[str, ...]) -> None:
    """Publish ALERTS (JSON objects) and/or a JSON-lines file, with publisher confirms.

    Bodies are sent exactly as given, so invalid ones can be used to test the
    dead-letter queue. The queues are declared first, as alertd declares them.
    """
    from alertd.publish import publish_bodies

    bodies = [a.encode() for a in alerts]
    if path is not None:
        bodies += [line.rstrip(b"\r\n") for line in path if line.strip()]
    if not bodies:
        raise click.UsageError("nothing to publish: give ALERTS or --file")
    # A queue it creates gets the arguments alertd would give it (the same
    # --config file gives the same ones), or alertd's own declare is refused.
    settings = Settings(amqp_url=amqp_url, queue=queue, queue_type=queue_type,
                        delivery_limit=delivery_limit)
    count = publish_bodies(settings, bodies)
    click.echo(f"published {count} alerts to {queue!r} (confirmed)")


@cli.command()
@config_option
@_opt("control-socket", cls=EmptyEnvIsOff, default="/tmp/alertd.sock",
      help="The master's control socket.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON document.")
def status(control_socket: str, as_json: bool) -> None:
    """Live view of the master: children, their slots and what each one is doing."""
    from alertd.statusclient import fetch_status, render_status

    if not control_socket:
        raise AlertdError("control_socket is '' (off): no master answers 'alertd status'; "
                          "give --control-socket PATH")
    doc = fetch_status(control_socket)
    click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if as_json
               else render_status(doc))


@cli.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters (<queue>.dlq)."""


DLQ_OPTIONS: list[Decorator] = [
    config_option,
    _opt("amqp-url", default=_D.amqp_url, help="Broker URL."),
    _opt("queue", default=_D.queue, help="Main queue; its DLQ is <queue>.dlq."),
]

_dlq_options = _all_of(DLQ_OPTIONS)


@dlq.command("list")
@_dlq_options
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(amqp_url: str, queue: str, limit: int, as_json: bool) -> None:
    """List dead letters with their reason; every message stays in the DLQ."""
    from alertd.deadletters import list_dead_letters

    letters = list_dead_letters(Settings(amqp_url=amqp_url, queue=queue), limit)
    for letter in letters:
        doc = letter.summary()
        click.echo(orjson.dumps(doc).decode() if as_json else
                   f"{doc['position']:>4}  {doc['alert_id'] or '-':<40} {doc['reason']}")
    if not as_json:
        click.echo(f"{len(letters)} dead letters shown (nothing was removed)", err=True)


@dlq.command("show")
@_dlq_options
@click.argument("which")
def dlq_show(amqp_url: str, queue: str, which: str) -> None:
    """Print one dead letter (by alert id, or by position from 'dlq list'): headers and body."""
    from alertd.deadletters import list_dead_letters

    for letter in list_dead_letters(Settings(amqp_url=amqp_url, queue=queue), 10_000):
        if letter.alert_id == which or str(letter.position) == which:
            headers = {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                       for k, v in letter.headers.items()}
            click.echo(orjson.dumps({"headers": headers}, default=str,
                                    option=orjson.OPT_INDENT_2).decode())
            click.echo(letter.body.decode("utf-8", "replace"))
            return
    raise click.ClickException(f"no dead letter {which!r}")


@dlq.command("replay")
@_dlq_options
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.argument("alert_ids", nargs=-1)
def dlq_replay(amqp_url: str, queue: str, replay_all: bool, alert_ids: tuple[str, ...]) -> None:
    """Send the dead letters of ALERT_IDS (or --all) back to the main queue as fresh alerts."""
    from alertd.deadletters import replay

    if not replay_all and not alert_ids:
        raise click.UsageError("give ALERT_IDS or --all")
    done = replay(Settings(amqp_url=amqp_url, queue=queue),
                  alert_ids=None if replay_all else set(alert_ids))
    click.echo(f"replayed {len(done.letters)} dead letters to {queue!r}")
    if done.left:
        click.echo(f"{done.left} more dead letters were not looked at; run it again", err=True)


@dlq.command("purge")
@_dlq_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(amqp_url: str, queue: str, yes: bool) -> None:
    """Delete every dead letter (asks first)."""
    from alertd.deadletters import purge

    if not yes:
        click.confirm(f"Delete every message in {queue}.dlq?", abort=True)
    click.echo(f"purged {purge(Settings(amqp_url=amqp_url, queue=queue))} dead letters")


@cli.group()
def outbox() -> None:
    """Webhook deliveries not yet successful."""


@outbox.command("list")
@config_option
@_opt("dsn", default=_D.dsn, help="PostgreSQL connection URL.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def outbox_list(dsn: str, limit: int, as_json: bool) -> None:
    """Pending, failed and gone webhook deliveries, oldest first."""
    from alertd.operations import undelivered_webhooks

    for row in undelivered_webhooks(dsn, limit):
        click.echo(orjson.dumps(row, default=str).decode() if as_json else
                   f"{row['webhook_id']}  {row['alert_id']:<30} {row['status']:<8} "
                   f"attempts={row['attempts']} last={row['last_status_code'] or '-'} "
                   f"{row['last_error'] or ''}")


@outbox.command("retry")
@config_option
@_opt("dsn", default=_D.dsn, help="PostgreSQL connection URL.")
@click.option("--all", "retry_all", is_flag=True, help="Every pending or failed delivery.")
@click.argument("webhook_ids", nargs=-1)
def outbox_retry(dsn: str, retry_all: bool, webhook_ids: tuple[str, ...]) -> None:
    """Make WEBHOOK_IDS (or --all) due now; a running alertd delivers them."""
    from alertd.operations import retry_webhooks

    if not retry_all and not webhook_ids:
        raise click.UsageError("give WEBHOOK_IDS or --all")
    count = retry_webhooks(dsn, None if retry_all else list(webhook_ids))
    click.echo(f"{count} webhook deliveries due now")


def main() -> None:
    """Entry point: every refusal is one line on stderr with a documented exit code."""
    try:
        cli.main(prog_name="alertd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        click.echo(f"alertd: error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"alertd: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(EXIT_CRASH)
    except ConfigError as exc:
        click.echo(f"alertd: config error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except AlertdError as exc:
        click.echo(f"alertd: error: {exc}", err=True)
        sys.exit(EXIT_CRASH)
    sys.exit(0)

