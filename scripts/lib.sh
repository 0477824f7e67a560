# Shared by scripts/test and scripts/demo: install what is missing, start what is stopped.
# Sourced, not run. Everything here is idempotent.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALERTD_VENV:-$ROOT/.venv}"

say() { printf '==> %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_ffmpeg() {
  command -v ffprobe >/dev/null 2>&1 && command -v ffmpeg >/dev/null 2>&1 && return
  say "installing ffmpeg (Debian package)"
  apt_install ffmpeg
}

ensure_venv() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.alertd-installed-$extras"
  if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
    say "pip install -e .$extras"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e "$ROOT$extras"
    touch "$stamp"
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port="$1" what="$2"
  for _ in $(seq 1 60); do port_open "$port" && return 0; sleep 1; done
  say "$what did not come up on 127.0.0.1:$port"; return 1
}

ensure_postgres() {
  local installed_now=""
  if ! port_open 5432 && ! command -v pg_ctlcluster >/dev/null 2>&1; then
    say "installing PostgreSQL (Debian package)"
    apt_install postgresql
    installed_now=1
  fi
  local version; version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
  if [ -n "$installed_now" ]; then
    # The tests connect as postgres@127.0.0.1 without a password, as on the
    # reference machines; only a cluster installed right here is changed.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q "alertd: loopback trust" "$hba"; then
      sed -i '1i host all postgres 127.0.0.1/32 trust # alertd: loopback trust\nhost all postgres ::1/128 trust # alertd: loopback trust' "$hba"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload >/dev/null 2>&1 || true
  fi
  port_open 5432 && return
  say "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432 PostgreSQL
}

ensure_rabbitmq() {
  port_open 5672 && rabbitmqctl -q status >/dev/null 2>&1 && return
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    say "installing RabbitMQ (Debian package)"
    apt_install rabbitmq-server
  fi
  if ! port_open 5672; then
    say "starting RabbitMQ"
    rabbitmq-server -detached || true
  fi
  wait_port 5672 RabbitMQ
  rabbitmqctl -q await_startup >/dev/null 2>&1 || true
}

ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return
  say "installing promtool (Debian package prometheus)"
  apt_install --no-install-recommends prometheus
}
