# alertd container image: `alertd start` as PID 1, ffprobe from Debian.
# Build: docker build -t alertd:0.1.0 .   Run: docs/deployment.md.

# --- build: a virtualenv with alertd and its runtime dependencies only --------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# .dockerignore lets only setup.cfg, pyproject.toml, README.md and alertd/ in.
COPY . /src
# Every dependency ships wheels for CPython 3.11, so no compiler is needed.
# pip and setuptools leave the venv afterwards: the image installs nothing.
RUN python -m venv /opt/alertd \
 && /opt/alertd/bin/pip install /src \
 && /opt/alertd/bin/pip uninstall --yes pip setuptools

# --- runtime -------------------------------------------------------------------
FROM python:3.11-slim
# Debian's versions are not pinned (DL3008): the mirror drops old ones, and a
# rebuild on a fresh python:3.11-slim is how security fixes arrive.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install --yes --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 alertd \
 && useradd --system --uid 10001 --gid alertd --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin alertd \
 && install -d -o alertd -g alertd -m 0700 /var/cache/alertd
COPY --from=build /opt/alertd /opt/alertd

# Settings come as ALERTD_* variables (Kubernetes: ConfigMap and Secret).
# Metrics and probes listen on all addresses inside the pod network.
ENV PATH=/opt/alertd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    ALERTD_METRICS_HOST=0.0.0.0 \
    ALERTD_METRICS_PORT=9100 \
    ALERTD_DOWNLOAD_DIR=/var/cache/alertd \
    ALERTD_CONTROL_SOCKET=/tmp/alertd.sock
EXPOSE 9100
# Numeric, so Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001

# No tini: the master handles TERM/INT/QUIT/HUP itself (PID 1 gets no default
# signal actions, only handlers), and it reaps with waitpid(-1), so orphans
# such as an ffprobe whose child was killed are reaped too.
STOPSIGNAL SIGTERM
# Ignored by Kubernetes (it uses the probes in conf/k8s); for plain docker.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['ALERTD_METRICS_PORT'], timeout=4)"]
ENTRYPOINT ["alertd", "start"]
