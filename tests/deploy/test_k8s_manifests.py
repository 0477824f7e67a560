"""conf/k8s: offline schema validation and the numbers that must agree with alertd.

Kubernetes objects are validated with kubernetes-validate (it ships the
schemas; strict mode refuses unknown fields) for the oldest and newest
Kubernetes this repo supports. KEDA objects have no schema there: their
fields are checked against KEDA's documentation (2.16), cited below.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
from typing import Any

import kubernetes_validate
import pytest

from alertd.exitcodes import EXIT_CONFIG, EXIT_CRASH, EXIT_USAGE
from alertd.master import KILL_AFTER_ABORT_S
from tests.deploy.files import (
    ALERTD,
    DOCKERFILE,
    K8S,
    PRUNE_UNIT,
    TEST_SECRET,
    core_manifests,
    cpus,
    k8s_objects,
    mebibytes,
    read_unit,
    run,
    tool,
    yaml_docs,
)

KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
# Master.handle_term: graceful_timeout, then 15 s to SIGKILL, then 5 s to reap.
MASTER_STOP_MARGIN_S = 15 + 5
# Pod memory budget (docs/deployment.md, "Sizing").
MASTER_MIB, PROBE_MIB_PER_SLOT = 64, 32
POSTGRES_MAX_CONNECTIONS = 100 - 3  # default max_connections - superuser_reserved

# KEDA's RabbitMQ scaler, https://keda.sh/docs/2.16/scalers/rabbitmq-queue/
# ("Trigger Specification", "Parameter list", "Authentication Parameters");
# the deprecated queueLength is left out on purpose.
RABBITMQ_TRIGGER_FIELDS = {
    "host", "hostFromEnv", "usernameFromEnv", "passwordFromEnv", "protocol", "mode",
    "value", "activationValue", "queueName", "vhostName", "useRegex", "pageSize",
    "operation", "timeout", "excludeUnacknowledged", "unsafeSsl",
}
RABBITMQ_AUTH_PARAMETERS = {"host", "username", "password", "tls", "ca", "cert", "key",
                            "workloadIdentityResource"}
# https://keda.sh/docs/2.16/reference/scaledobject-spec/
SCALED_OBJECT_SPEC_FIELDS = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
    "triggers",
}
TRIGGER_FIELDS = {"type", "metadata", "name", "useCachedMetrics", "authenticationRef",
                  "metricType"}
# TriggerAuthentication CRD (kedacore/keda config/crd/bases/
# keda.sh_triggerauthentications.yaml): spec and secretTargetRef item fields.
TRIGGER_AUTH_SPEC_FIELDS = {
    "awsSecretManager", "azureKeyVault", "boundServiceAccountToken", "configMapTargetRef",
    "env", "gcpSecretManager", "hashiCorpVault", "podIdentity", "secretTargetRef",
}
SECRET_TARGET_REF_FIELDS = {"parameter", "name", "key"}

objects = k8s_objects("configmap.yaml", "deployment.yaml", "pdb.yaml", "keda.yaml",
                      "prune-cronjob.yaml")
alternatives = k8s_objects("alternatives/hpa-external.yaml")
secrets = {d["metadata"]["name"]: d for d in yaml_docs(K8S / "secret.example.yaml")}
settings: dict[str, str] = objects["ConfigMap"]["data"]
deployment = objects["Deployment"]
pod = deployment["spec"]["template"]["spec"]
container = pod["containers"][0]
scaled_object = objects["ScaledObject"]
trigger = scaled_object["spec"]["triggers"][0]
prune_cronjob = objects["CronJob"]
prune_job = prune_cronjob["spec"]["jobTemplate"]["spec"]
prune_pod = prune_job["template"]["spec"]
prune_container = prune_pod["containers"][0]

WORKERS = int(settings["ALERTD_WORKERS"])
CONCURRENCY = int(settings["ALERTD_CONCURRENCY"])
SLOTS_PER_POD = WORKERS * CONCURRENCY


def validated_documents() -> list[tuple[str, dict[str, Any]]]:
    names = [*core_manifests(), "secret.example.yaml", "alternatives/hpa-external.yaml"]
    return [(f"{name}:{doc['kind']}", doc) for name in names for doc in yaml_docs(K8S / name)
            if doc["kind"] not in KEDA_KINDS]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), validated_documents(),
                         ids=[n for n, _ in validated_documents()])
def test_manifest_validates_against_the_kubernetes_schema(
        name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_refuses_an_unknown_field() -> None:
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_core_manifest_and_not_the_secret() -> None:
    listed = core_manifests()
    assert all((K8S / name).is_file() for name in listed)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - set(listed) == {"secret.example.yaml"}
    kinds = {doc["kind"] for name in listed for doc in yaml_docs(K8S / name)}
    assert kinds == {"ConfigMap", "Deployment", "PodDisruptionBudget", "ScaledObject",
                     "TriggerAuthentication", "CronJob"}


def test_kubectl_kustomize_renders_the_core_manifests() -> None:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomize rendering not checked "
                    "(the resource list is checked above)")
    result = run([kubectl, "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    assert "kind: ScaledObject" in result.stdout and "image: alertd:0.1.0" in result.stdout
    assert "kind: CronJob" in result.stdout


# -- KEDA ------------------------------------------------------------------------------

def test_scaled_object_and_trigger_use_only_documented_fields() -> None:
    spec = scaled_object["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC_FIELDS
    assert scaled_object["apiVersion"] == "keda.sh/v1alpha1"
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name",
                                           "envSourceContainerName"}
    for each in spec["triggers"]:
        assert set(each) <= TRIGGER_FIELDS
        assert each["type"] == "rabbitmq"
        assert set(each["metadata"]) <= RABBITMQ_TRIGGER_FIELDS
        assert all(isinstance(v, str) for v in each["metadata"].values()), \
            "KEDA trigger metadata values are strings"


def test_trigger_authentication_uses_only_documented_fields() -> None:
    auth = objects["TriggerAuthentication"]
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert set(auth["spec"]) <= TRIGGER_AUTH_SPEC_FIELDS
    for ref in auth["spec"]["secretTargetRef"]:
        assert set(ref) == SECRET_TARGET_REF_FIELDS
        assert ref["parameter"] in RABBITMQ_AUTH_PARAMETERS
        assert ref["key"] in secrets[ref["name"]]["stringData"], "the example Secret has it"


def test_keda_counts_in_flight_messages_through_the_management_api() -> None:
    meta = trigger["metadata"]
    assert meta["protocol"] == "http" and meta["mode"] == "QueueLength"
    assert meta.get("excludeUnacknowledged", "false") == "false"
    assert meta["queueName"] == settings["ALERTD_QUEUE"]
    assert trigger["authenticationRef"]["name"] == objects["TriggerAuthentication"][
        "metadata"]["name"]
    host = secrets["alertd-rabbitmq-management"]["stringData"]["host"]
    assert host.startswith(("http://", "https://")), "protocol http needs the management URL"


def test_keda_target_is_the_in_flight_slots_of_one_pod() -> None:
    assert int(trigger["metadata"]["value"]) == SLOTS_PER_POD


def test_scaled_object_scales_the_deployment_within_sane_bounds() -> None:
    spec = scaled_object["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]


@pytest.mark.parametrize("max_replicas", [
    scaled_object["spec"]["maxReplicaCount"], alternatives["HorizontalPodAutoscaler"]["spec"][
        "maxReplicas"]], ids=["keda", "hpa"])
def test_the_largest_scale_fits_postgres_default_connection_limit(max_replicas: int) -> None:
    pool = int(settings["ALERTD_DB_POOL_SIZE"])
    assert max_replicas * WORKERS * pool <= POSTGRES_MAX_CONNECTIONS


# -- the plain HPA alternative ----------------------------------------------------------

def test_hpa_targets_the_in_flight_slots_of_one_pod_on_ready_and_unacked() -> None:
    hpa = alternatives["HorizontalPodAutoscaler"]["spec"]
    names = set()
    for metric in hpa["metrics"]:
        external = metric["external"]
        names.add(external["metric"]["name"])
        assert external["metric"]["selector"]["matchLabels"]["queue"] == settings["ALERTD_QUEUE"]
        assert external["target"] == {"type": "AverageValue",
                                      "averageValue": str(SLOTS_PER_POD)}
    assert names == {"rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked"}
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_prometheus_adapter_rules_serve_the_hpas_metrics_across_namespaces() -> None:
    rules = yaml_docs(K8S / "alternatives" / "prometheus-adapter-rules.yaml")[0]["externalRules"]
    served = {rule["name"]["as"]: rule for rule in rules}
    for metric in alternatives["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        rule = served[metric["external"]["metric"]["name"]]
        assert rule["resources"] == {"namespaced": False}
        assert metric["external"]["metric"]["name"] in rule["seriesQuery"]
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]


# -- the Deployment ---------------------------------------------------------------------

def test_termination_grace_outlasts_the_masters_graceful_stop() -> None:
    graceful = float(settings["ALERTD_GRACEFUL_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > graceful + MASTER_STOP_MARGIN_S


def test_rolling_update_starts_the_new_pod_before_draining_an_old_one() -> None:
    strategy = deployment["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"


def test_probes_use_health_endpoints_on_the_metrics_port() -> None:
    assert "--metrics-host=0.0.0.0" in container["args"]
    port = int(next(a for a in container["args"] if a.startswith("--metrics-port="))
               .split("=")[1])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["metrics"] == port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == port and notes["prometheus.io/path"] == "/metrics"


def test_liveness_tolerates_a_hung_child_that_the_master_replaces() -> None:
    probe = container["livenessProbe"]
    assert probe["periodSeconds"] * (probe["failureThreshold"] - 1) > KILL_AFTER_ABORT_S + 1


def test_memory_is_sized_from_workers_and_concurrency() -> None:
    resources = container["resources"]
    child_mib = int(settings["ALERTD_MAX_MEMORY_PER_CHILD"]) / 2**20
    need = MASTER_MIB + WORKERS * (child_mib + CONCURRENCY * PROBE_MIB_PER_SLOT)
    assert mebibytes(resources["limits"]["memory"]) >= need
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert cpus(resources["limits"]["cpu"]) >= WORKERS


def test_downloads_volume_holds_a_full_clip_in_every_slot() -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    need_mib = SLOTS_PER_POD * int(settings["ALERTD_MAX_DOWNLOAD_BYTES"]) / 2**20
    assert mebibytes(volumes["downloads"]["emptyDir"]["sizeLimit"]) >= need_mib
    total = sum(mebibytes(v["emptyDir"]["sizeLimit"]) for v in volumes.values())
    assert mebibytes(container["resources"]["limits"]["ephemeral-storage"]) >= total


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    return env


def test_the_pod_runs_unprivileged_on_a_read_only_root() -> None:
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    uid = DOCKERFILE.read_text().split("\nUSER ")[1].split(":")[0]
    assert security["runAsUser"] == int(uid) != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    box = container["securityContext"]
    assert box["readOnlyRootFilesystem"] is True and box["allowPrivilegeEscalation"] is False
    assert box["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {dockerfile_env()["ALERTD_DOWNLOAD_DIR"], "/tmp"} <= mounts
    assert dockerfile_env()["ALERTD_CONTROL_SOCKET"].startswith("/tmp/")


def test_settings_and_secrets_reach_the_container_as_alertd_variables() -> None:
    sources = container["envFrom"]
    assert {"configMapRef": {"name": objects["ConfigMap"]["metadata"]["name"]}} in sources
    assert {"secretRef": {"name": "alertd"}} in sources
    assert all(key.startswith("ALERTD_") for key in [*settings, *secrets["alertd"]["stringData"]])
    assert pod["enableServiceLinks"] is False


def test_pdb_evicts_one_pod_at_a_time_from_this_deployment() -> None:
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"] == deployment["spec"]["selector"]


def container_check_config(secret: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], **dockerfile_env(), **settings,
           **secrets["alertd"]["stringData"], "ALERTD_WEBHOOK_SECRET": secret}
    env["PATH"] = os.environ["PATH"]
    return run([ALERTD, "check-config", *container["args"]], env=env)


def test_alertd_accepts_the_image_configmap_secret_and_args_together() -> None:
    result = container_check_config(TEST_SECRET)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["workers"], shown["concurrency"]) == (WORKERS, CONCURRENCY)
    assert (shown["metrics_host"], shown["metrics_port"]) == ("0.0.0.0", 9100)
    assert math.isclose(shown["graceful_timeout"], float(settings["ALERTD_GRACEFUL_TIMEOUT"]))


def test_the_example_secret_is_refused_until_its_webhook_secret_is_replaced() -> None:
    placeholder = secrets["alertd"]["stringData"]["ALERTD_WEBHOOK_SECRET"]
    assert container_check_config(placeholder).returncode == EXIT_CONFIG


# -- retention: the prune CronJob --------------------------------------------------------

def test_the_prune_job_runs_the_workers_image_with_their_settings_and_secret() -> None:
    assert prune_container["image"] == container["image"]
    assert prune_container["envFrom"] == container["envFrom"]
    assert prune_container["command"][:3] == ["alertd", "db", "prune"]
    assert "--yes" in prune_container["command"], "no terminal to answer the prompt"
    for key in ("automountServiceAccountToken", "enableServiceLinks"):
        assert prune_pod[key] is pod[key] is False, key


def test_the_prune_pod_is_sandboxed_like_the_workers() -> None:
    assert prune_pod["securityContext"] == pod["securityContext"]
    assert prune_container["securityContext"] == container["securityContext"]
    assert "volumeMounts" not in prune_container, "prune writes no file"


def test_prune_pods_are_not_taken_for_workers_by_the_deployment_or_the_pdb() -> None:
    labels = prune_job["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"],
                     objects["PodDisruptionBudget"]["spec"]["selector"]):
        assert not selector["matchLabels"].items() <= labels.items()


def test_prune_is_off_until_the_operator_unsuspends_it() -> None:
    # Retention deletes results: applying the manifests (an upgrade) never
    # starts it.
    assert prune_cronjob["spec"]["suspend"] is True


def test_prune_runs_daily_never_overlap_and_stop_within_the_deadline() -> None:
    spec = prune_cronjob["spec"]
    minute, hour, *rest = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"], "once a day"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 0 < prune_job["activeDeadlineSeconds"] <= 6 * 3600
    assert 0 < spec["startingDeadlineSeconds"] < 24 * 3600
    assert 1 <= prune_job["backoffLimit"] <= 3
    assert prune_pod["restartPolicy"] == "Never", "podFailurePolicy needs it"


def test_a_bad_command_line_or_configuration_fails_the_prune_job_without_retries() -> None:
    fail_job = [r for r in prune_job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert [r["onExitCodes"] for r in fail_job] == [{
        "containerName": prune_container["name"], "operator": "In",
        "values": [EXIT_USAGE, EXIT_CONFIG]}]


def test_the_prune_resources_are_requested_and_bounded() -> None:
    resources = prune_container["resources"]
    for key in ("cpu", "memory", "ephemeral-storage"):
        assert key in resources["requests"] and key in resources["limits"], key
    assert cpus(resources["requests"]["cpu"]) <= cpus(resources["limits"]["cpu"])
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_kubernetes_and_systemd_prune_after_the_same_default_days() -> None:
    days = next(a.split("=", 1)[1] for a in prune_container["command"]
                if a.startswith("--older-than="))
    assert f"ALERTD_PRUNE_DAYS={days}" in read_unit(PRUNE_UNIT).values("Service", "Environment")


def test_alertd_takes_the_prune_jobs_command_configmap_and_secret_up_to_the_database() -> None:
    # Only a database is missing: no usage (2) or config (3) error before it.
    env = {**dockerfile_env(), **settings, **secrets["alertd"]["stringData"],
           "ALERTD_DSN": "postgresql://alertd:x@127.0.0.1:1/alertd",
           "PATH": os.environ["PATH"]}
    result = run([ALERTD, *prune_container["command"][1:]], env=env)
    assert result.returncode == EXIT_CRASH, result.stderr
    assert "database unavailable" in result.stderr
