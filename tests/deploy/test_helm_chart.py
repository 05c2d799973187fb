"""The Helm chart (deploy/helm/voucher-bridge): `helm lint`, and what `helm template` renders
for the value sets that matter, parsed and checked object by object. No cluster is needed.

`helm` is taken from the PATH or var/tools/go/bin, else built there from the Go module proxy
(about two minutes, once); without `go` the tests are skipped, saying so.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.gotools import go_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "voucher-bridge"
HELM_MODULE = "helm.sh/helm/v3/cmd/helm@v3.22.0"

# Building helm takes about two minutes the first time, inside the first test's time.
pytestmark = pytest.mark.timeout(900)

RELEASE = "vb"
FULLNAME = "vb-voucher-bridge"
STATE_DIR = "/var/lib/voucher-bridge"
SQLITE_URL = "sqlite:////var/lib/voucher-bridge/idempotency.sqlite3"

# Settings that are secrets: never in the ConfigMap (settings.py's SecretStr fields and the
# store URL, which carries PostgreSQL's password).
SECRET_SETTINGS = {
    "evoucherTerminals": "EVOUCHER_TERMINALS",
    "epinApiKey": "EPIN_API_KEY",
    "epinAccounts": "EPIN_ACCOUNTS",
    "kafkaSaslPassword": "KAFKA_SASL_PASSWORD",
    "kafkaSslKeyPassword": "KAFKA_SSL_KEY_PASSWORD",
    "idempotencyStoreUrl": "IDEMPOTENCY_STORE_URL",
    "consoleUsers": "CONSOLE_USERS",
}

POSTGRES_2 = {
    "replicaCount": 2,
    "store": {"kind": "postgres"},
    "secrets": {"idempotencyStoreUrl": {"existingSecret": "vb-store", "key": "url"}},
}


@pytest.fixture(scope="session")
def helm() -> str:
    return go_tool("helm", HELM_MODULE)


class Rendered:
    """The objects of one `helm template`, by kind."""

    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.documents = documents

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.documents)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"{len(found)} objects of kind {kind}: {self.kinds()}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        entries = self.container["env"]
        names = [e["name"] for e in entries]
        assert len(names) == len(set(names)), f"an env variable set twice: {names}"
        return {e["name"]: e for e in entries}

    @property
    def config(self) -> dict[str, str]:
        return self.one("ConfigMap")["data"]

    def volume(self, name: str) -> dict[str, Any]:
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == name]
        return volume

    def mount(self, path: str) -> dict[str, Any]:
        (mount,) = [m for m in self.container["volumeMounts"] if m["mountPath"] == path]
        return mount


def _helm_template(helm: str, values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    # JSON is YAML: the values go to helm as a values file on stdin.
    return subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", "pos", "--values", "-"],
        input=json.dumps(values),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="session")
def render(helm: str) -> Callable[..., Rendered]:
    def render(values: dict[str, Any] | None = None) -> Rendered:
        done = _helm_template(helm, values or {})
        assert done.returncode == 0, done.stderr
        return Rendered([d for d in yaml.safe_load_all(done.stdout) if d])

    return render


@pytest.fixture(scope="session")
def render_error(helm: str) -> Callable[[dict[str, Any]], str]:
    def render_error(values: dict[str, Any]) -> str:
        done = _helm_template(helm, values)
        assert done.returncode != 0, f"rendered, but should have failed:\n{done.stdout}"
        return " ".join(done.stderr.split())

    return render_error


def secret_env(rendered: Rendered, name: str) -> dict[str, Any]:
    entry = rendered.env[name]
    assert "value" not in entry, f"{name} has a plain value"
    return entry["valueFrom"]["secretKeyRef"]


# Lint


@pytest.mark.parametrize(
    "values", [{}, POSTGRES_2], ids=["default values", "postgres, two replicas"]
)
def test_the_chart_lints(helm: str, values: dict[str, Any]) -> None:
    done = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--values", "-"],
        input=json.dumps(values),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


# What the defaults render


def test_the_defaults_render_no_secret_pdb_or_service_monitor(render: Callable[..., Rendered]):
    rendered = render()
    assert rendered.kinds() == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    assert rendered.deployment["spec"]["replicas"] == 1


def test_the_image_defaults_to_the_apps_version(render: Callable[..., Rendered]):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert app_version == "0.1.0"
    assert render().container["image"] == f"voucher-bridge:{app_version}"
    container = render(
        {"image": {"repository": "registry.example/vb", "tag": "1.2.3", "pullPolicy": "Always"}}
    ).container
    assert container["image"] == "registry.example/vb:1.2.3"
    assert container["imagePullPolicy"] == "Always"


def test_probes_and_the_http_port(render: Callable[..., Rendered]):
    rendered = render()
    container = rendered.container
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    # The endpoints ask the broker within 5 s: a probe that gives up sooner fails a healthy pod.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["timeoutSeconds"] > 5
    (port,) = rendered.one("Service")["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert rendered.one("Service")["spec"]["type"] == "ClusterIP"


def test_probe_timings_come_from_values(render: Callable[..., Rendered]):
    container = render(
        {
            "probes": {
                "startup": {"enabled": False},
                "liveness": {"periodSeconds": 20, "failureThreshold": 9},
                "readiness": {"timeoutSeconds": 7},
            }
        }
    ).container
    assert "startupProbe" not in container
    assert container["livenessProbe"]["periodSeconds"] == 20
    assert container["livenessProbe"]["failureThreshold"] == 9
    assert container["readinessProbe"]["timeoutSeconds"] == 7


def test_env_and_env_from(render: Callable[..., Rendered]):
    rendered = render()
    assert rendered.container["envFrom"] == [{"configMapRef": {"name": FULLNAME}}]
    assert rendered.one("ConfigMap")["metadata"]["name"] == FULLNAME
    env = rendered.env
    assert env["HTTP_HOST"]["value"] == "0.0.0.0"
    assert env["HTTP_PORT"]["value"] == "8080"
    assert env["DRAIN_TIMEOUT_S"]["value"] == "30"
    assert "VOUCHER_BRIDGE_SECRETS_DIR" not in env


def test_the_default_settings(render: Callable[..., Rendered]):
    assert render().config == {
        "WORKERS": "1",
        "KAFKA_GROUP_ID": "voucher-bridge",
        "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "POS_COMMANDS_TOPIC": "pos.commands",
        "POS_RESULTS_TOPIC": "pos.results",
        "COUPON_COMMANDS_TOPIC": "coupon.commands",
        "COUPON_RESULTS_TOPIC": "coupon.results",
        "EVOUCHER_BASE_URL": "https://evoucher.cy",
        "IDEMPOTENCY_STORE_URL": SQLITE_URL,
        "LOG_LEVEL": "INFO",
        "OTEL_SERVICE_NAME": "voucher-bridge",
    }


def test_typed_settings_and_the_free_config_map(render: Callable[..., Rendered]):
    config = render(
        {
            "kafka": {
                "bootstrapServers": "k1:9093,k2:9093",
                "groupId": "vb-prod",
                "securityProtocol": "SSL",
                "topics": {"posCommands": "prod.pos.commands"},
            },
            "epin": {"baseUrl": "https://epin.example/api/v1"},
            "processing": {"maxInFlight": 500, "commandTimeoutSeconds": 90.5, "workers": 3},
            "otel": {"exporterOtlpEndpoint": "http://otel-collector:4318"},
            "logLevel": "DEBUG",
            "config": {
                "MAX_RECORD_BYTES": 1048576,
                "UPSTREAM_RETRY_BASE_DELAY_S": 0.2,
                "RETENTION_CHECK": "refuse",
                "OTEL_TRACES_EXPORTER": "otlp",
            },
        }
    ).config
    assert config["KAFKA_BOOTSTRAP_SERVERS"] == "k1:9093,k2:9093"
    assert config["KAFKA_GROUP_ID"] == "vb-prod"
    assert config["KAFKA_SECURITY_PROTOCOL"] == "SSL"
    assert config["POS_COMMANDS_TOPIC"] == "prod.pos.commands"
    assert config["POS_RESULTS_TOPIC"] == "pos.results"
    assert config["EPIN_BASE_URL"] == "https://epin.example/api/v1"
    assert config["MAX_IN_FLIGHT"] == "500"
    assert config["WORKERS"] == "3"
    assert config["COMMAND_TIMEOUT_S"] == "90.5"
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert config["LOG_LEVEL"] == "DEBUG"
    # A values file's numbers are floats to helm: a whole one must not become 1.048576e+06.
    assert config["MAX_RECORD_BYTES"] == "1048576"
    assert config["UPSTREAM_RETRY_BASE_DELAY_S"] == "0.2"
    assert config["RETENTION_CHECK"] == "refuse"
    assert config["OTEL_TRACES_EXPORTER"] == "otlp"


def test_every_config_map_name_is_a_setting_or_an_otel_variable(render: Callable[..., Rendered]):
    from voucher_bridge.settings import Settings

    settings = {name.upper() for name in Settings.model_fields}
    config = render(
        {"kafka": {"bootstrapServers": "k:9092", "saslMechanism": "PLAIN", "saslUsername": "u"}}
        | {"epin": {"baseUrl": "https://e.example/api/v1"}}
        | {"processing": {"maxInFlight": 10, "commandTimeoutSeconds": 60}}
        | {"otel": {"exporterOtlpEndpoint": "http://c:4318"}}
    ).config
    unknown = {n for n in config if n not in settings and not n.startswith("OTEL_")}
    assert unknown == {"LOG_LEVEL"}  # read by the CLI, not a Settings field


def test_security_contexts(render: Callable[..., Rendered]):
    rendered = render()
    pod = rendered.pod["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = rendered.container["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}


def test_resources(render: Callable[..., Rendered]):
    assert render().container["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"memory": "512Mi"},
    }


def test_writable_directories_are_volumes(render: Callable[..., Rendered]):
    rendered = render()
    assert rendered.volume(rendered.mount("/tmp")["name"])["emptyDir"] == {}
    assert rendered.volume(rendered.mount(STATE_DIR)["name"])["emptyDir"] == {}
    assert rendered.config["IDEMPOTENCY_STORE_URL"] == SQLITE_URL


def test_persistence_for_the_sqlite_store(render: Callable[..., Rendered]):
    rendered = render({"persistence": {"enabled": True, "size": "5Gi"}})
    claim = rendered.one("PersistentVolumeClaim")
    # helm uninstall must not delete the store.
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    state = rendered.volume(rendered.mount(STATE_DIR)["name"])
    assert state["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert rendered.deployment["spec"]["strategy"] == {"type": "Recreate"}

    rendered = render({"persistence": {"enabled": True, "existingClaim": "vb-store"}})
    assert rendered.all("PersistentVolumeClaim") == []
    state = rendered.volume(rendered.mount(STATE_DIR)["name"])
    assert state["persistentVolumeClaim"] == {"claimName": "vb-store"}


# Rollouts and shutdown


def test_the_sqlite_store_is_recreated_never_rolled(render: Callable[..., Rendered]):
    assert render().deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_a_shared_store_rolls_one_pod_at_a_time_without_surge(render: Callable[..., Rendered]):
    strategy = render(POSTGRES_2).deployment["spec"]["strategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }


@pytest.mark.parametrize("drain", [None, 1, 50, 600])
def test_the_grace_period_is_the_drain_plus_15_seconds(
    render: Callable[..., Rendered], drain: int | None
) -> None:
    rendered = render({} if drain is None else {"drainTimeoutSeconds": drain})
    expected = 30 if drain is None else drain
    assert rendered.pod["terminationGracePeriodSeconds"] == expected + 15
    assert rendered.env["DRAIN_TIMEOUT_S"]["value"] == str(expected)


def test_a_settings_change_rolls_the_pods(render: Callable[..., Rendered]):
    def checksum(values: dict[str, Any]) -> str:
        annotations = render(values).deployment["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    default = checksum({})
    assert len(default) == 64
    assert checksum({}) == default
    assert checksum({"config": {"RETENTION_CHECK": "refuse"}}) != default
    assert checksum({"kafka": {"groupId": "other"}}) != default


# Secrets


def test_secrets_come_from_existing_secret_keys(render: Callable[..., Rendered]):
    secrets = {
        name: {"existingSecret": f"secret-{i}", "key": f"key-{i}"}
        for i, name in enumerate(SECRET_SETTINGS)
    }
    rendered = render(POSTGRES_2 | {"kafka": {"securityProtocol": "SASL_SSL"}, "secrets": secrets})
    for i, env_name in enumerate(SECRET_SETTINGS.values()):
        assert secret_env(rendered, env_name) == {"name": f"secret-{i}", "key": f"key-{i}"}
    assert rendered.all("Secret") == []


def test_a_secret_key_defaults_to_the_settings_file_name(render: Callable[..., Rendered]):
    rendered = render(
        {
            "secrets": {
                "evoucherTerminals": {"existingSecret": "vb"},
                "epinAccounts": {"existingSecret": "vb", "key": ""},
                # Any setting can come from a Secret, named in camelCase.
                "otelExporterOtlpHeaders": {"existingSecret": "vb-otel"},
            }
        }
    )
    assert secret_env(rendered, "EVOUCHER_TERMINALS") == {"name": "vb", "key": "evoucher_terminals"}
    assert secret_env(rendered, "EPIN_ACCOUNTS") == {"name": "vb", "key": "epin_accounts"}
    assert secret_env(rendered, "OTEL_EXPORTER_OTLP_HEADERS") == {
        "name": "vb-otel",
        "key": "otel_exporter_otlp_headers",
    }
    assert "EPIN_API_KEY" not in rendered.env  # not given: nothing referenced


def test_no_secret_setting_is_in_the_config_map(render: Callable[..., Rendered]):
    everything = POSTGRES_2 | {
        "kafka": {"securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512"},
        "secrets": {name: {"existingSecret": "vb"} for name in SECRET_SETTINGS},
        "secretsDir": {"existingSecret": "vb-files"},
        "kafkaTls": {"existingSecret": "vb-tls"},
    }
    for values in ({}, POSTGRES_2, everything):
        rendered = render(values)
        in_config = set(rendered.config) & set(SECRET_SETTINGS.values())
        # The store URL only as the SQLite file, which holds no password.
        assert in_config <= ({"IDEMPOTENCY_STORE_URL"} if values == {} else set())
        assert rendered.all("Secret") == []
        for entry in rendered.env.values():
            if entry["name"] in SECRET_SETTINGS.values():
                assert "value" not in entry
    assert render().config["IDEMPOTENCY_STORE_URL"] == SQLITE_URL
    assert "IDEMPOTENCY_STORE_URL" not in render(POSTGRES_2).config


@pytest.mark.parametrize("env_name", sorted(SECRET_SETTINGS.values()))
def test_a_secret_setting_in_config_is_refused(
    render_error: Callable[[dict[str, Any]], str], env_name: str
) -> None:
    message = render_error({"config": {env_name: "s3cr3t"}})
    assert f"config.{env_name} is a secret setting and must not be in the ConfigMap" in message
    assert "s3cr3t" not in message


def test_a_secret_setting_as_a_plain_extra_env_value_is_refused(
    render_error: Callable[[dict[str, Any]], str],
):
    message = render_error({"extraEnv": [{"name": "EPIN_API_KEY", "value": "k"}]})
    assert "extraEnv EPIN_API_KEY is a secret setting with a plain value" in message


def test_the_secrets_directory(render: Callable[..., Rendered]):
    rendered = render({"secretsDir": {"existingSecret": "vb-files"}})
    mount = rendered.mount("/etc/voucher-bridge/secrets")
    assert mount["readOnly"] is True
    volume = rendered.volume(mount["name"])
    assert volume["secret"]["secretName"] == "vb-files"
    assert "items" not in volume["secret"]  # every key is a file, named as its setting
    assert rendered.env["VOUCHER_BRIDGE_SECRETS_DIR"]["value"] == "/etc/voucher-bridge/secrets"

    rendered = render({"secretsDir": {"existingSecret": "vb-files", "mountPath": "/run/vb"}})
    assert rendered.mount("/run/vb")["readOnly"] is True
    assert rendered.env["VOUCHER_BRIDGE_SECRETS_DIR"]["value"] == "/run/vb"


def test_the_postgres_url_from_the_secrets_directory_is_required_by_the_pod(
    render: Callable[..., Rendered],
):
    # Without the file the service would fall back to a SQLite file of each pod's own: the
    # key is referenced too, so a pod without it does not start.
    rendered = render(
        {"replicaCount": 2, "store": {"kind": "postgres"}, "secretsDir": {"existingSecret": "f"}}
    )
    assert secret_env(rendered, "IDEMPOTENCY_STORE_URL") == {
        "name": "f",
        "key": "idempotency_store_url",
    }
    assert rendered.env["VOUCHER_BRIDGE_SECRETS_DIR"]["value"] == "/etc/voucher-bridge/secrets"


def test_kafka_tls_files(render: Callable[..., Rendered]):
    rendered = render(
        {
            "kafka": {"securityProtocol": "SSL"},
            "kafkaTls": {"existingSecret": "vb-kafka-tls"},
            "secrets": {"kafkaSslKeyPassword": {"existingSecret": "vb-kafka-tls", "key": "pass"}},
        }
    )
    mount = rendered.mount("/etc/voucher-bridge/kafka-tls")
    assert mount["readOnly"] is True
    secret = rendered.volume(mount["name"])["secret"]
    assert secret["secretName"] == "vb-kafka-tls"
    assert {i["key"]: i["path"] for i in secret["items"]} == {
        "ca.crt": "ca.crt",
        "tls.crt": "tls.crt",
        "tls.key": "tls.key",
    }
    env = rendered.env
    assert env["KAFKA_SSL_CAFILE"]["value"] == "/etc/voucher-bridge/kafka-tls/ca.crt"
    assert env["KAFKA_SSL_CERTFILE"]["value"] == "/etc/voucher-bridge/kafka-tls/tls.crt"
    assert env["KAFKA_SSL_KEYFILE"]["value"] == "/etc/voucher-bridge/kafka-tls/tls.key"
    assert secret_env(rendered, "KAFKA_SSL_KEY_PASSWORD") == {"name": "vb-kafka-tls", "key": "pass"}
    assert not {"KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE"} & set(
        rendered.config
    )


def test_kafka_tls_with_a_ca_only(render: Callable[..., Rendered]):
    rendered = render(
        {
            "kafkaTls": {
                "existingSecret": "ca",
                "mountPath": "/etc/kafka-ca",
                "caKey": "bundle.pem",
                "certKey": "",
                "keyKey": "",
            }
        }
    )
    secret = rendered.volume(rendered.mount("/etc/kafka-ca")["name"])["secret"]
    assert secret["items"] == [{"key": "bundle.pem", "path": "bundle.pem"}]
    assert rendered.env["KAFKA_SSL_CAFILE"]["value"] == "/etc/kafka-ca/bundle.pem"
    assert "KAFKA_SSL_CERTFILE" not in rendered.env
    assert "KAFKA_SSL_KEYFILE" not in rendered.env


# Other objects


def test_a_pod_disruption_budget_with_several_replicas_or_when_enabled(
    render: Callable[..., Rendered],
):
    assert render().all("PodDisruptionBudget") == []
    rendered = render(POSTGRES_2)
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert render({"podDisruptionBudget": {"enabled": True}}).one("PodDisruptionBudget")


def test_the_service_monitor_only_when_enabled(render: Callable[..., Rendered]):
    assert render().all("ServiceMonitor") == []
    rendered = render(
        {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}}
    )
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    service_labels = rendered.one("Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["pos"]}


def test_the_service_account_mounts_no_token(render: Callable[..., Rendered]):
    rendered = render()
    account = rendered.one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert rendered.pod["serviceAccountName"] == account["metadata"]["name"]
    assert rendered.pod["automountServiceAccountToken"] is False
    rendered = render({"serviceAccount": {"create": False, "name": "shared"}})
    assert rendered.all("ServiceAccount") == []
    assert rendered.pod["serviceAccountName"] == "shared"


def test_scheduling_annotations_and_extra_env_pass_through(render: Callable[..., Rendered]):
    spread = [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "voucher-bridge"}},
        }
    ]
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["pos"]}]}
                ]
            }
        }
    }
    tolerations = [{"key": "pos", "operator": "Exists", "effect": "NoSchedule"}]
    from_field = {"fieldRef": {"fieldPath": "metadata.name"}}
    rendered = render(
        {
            "podAnnotations": {"example.com/team": "platform"},
            "nodeSelector": {"pool": "pos"},
            "tolerations": tolerations,
            "affinity": affinity,
            "topologySpreadConstraints": spread,
            "extraEnv": [
                {"name": "POD_NAME", "valueFrom": from_field},
                {"name": "PYTHONFAULTHANDLER", "value": "1"},
            ],
        }
    )
    pod = rendered.pod
    annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["example.com/team"] == "platform"
    assert "checksum/config" in annotations
    assert pod["nodeSelector"] == {"pool": "pos"}
    assert pod["tolerations"] == tolerations
    assert pod["affinity"] == affinity
    assert pod["topologySpreadConstraints"] == spread
    assert rendered.env["POD_NAME"]["valueFrom"] == from_field
    assert rendered.env["PYTHONFAULTHANDLER"]["value"] == "1"


# What must not render


def test_several_replicas_with_the_sqlite_store_fail_clearly(
    render_error: Callable[[dict[str, Any]], str],
):
    message = render_error({"replicaCount": 2})
    assert "replicaCount is 2 but store.kind is sqlite" in message
    assert "each pod would keep its own SQLite file" in message
    assert "a command could be applied twice" in message
    assert "store.kind=postgres" in message


def test_the_postgres_store_without_its_url_fails_clearly(
    render_error: Callable[[dict[str, Any]], str],
):
    message = render_error({"replicaCount": 2, "store": {"kind": "postgres"}})
    assert "store.kind is postgres but no store URL is given" in message
    assert "secrets.idempotencyStoreUrl.existingSecret" in message
    assert "secretsDir.existingSecret" in message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"secrets": {"idempotencyStoreUrl": {"existingSecret": "s"}}},
            "secrets.idempotencyStoreUrl is set but store.kind is sqlite",
        ),
        (
            POSTGRES_2 | {"persistence": {"enabled": True}},
            "persistence.enabled is for the sqlite store",
        ),
        (
            {"kafka": {"securityProtocol": "SASL_SSL"}},
            "kafka.securityProtocol is SASL_SSL but no SASL password is given",
        ),
        (
            {"kafkaTls": {"existingSecret": "t", "keyKey": ""}},
            "kafkaTls: certKey and keyKey go together",
        ),
        ({"config": {"HTTP_PORT": 9000}}, "config.HTTP_PORT is set by the chart itself"),
        (
            {"config": {"DRAIN_TIMEOUT_S": 10}},
            "config.DRAIN_TIMEOUT_S is set by drainTimeoutSeconds",
        ),
        ({"config": {"KAFKA_GROUP_ID": "g"}}, "config.KAFKA_GROUP_ID is set by kafka.groupId"),
        (
            {"extraEnv": [{"name": "HTTP_HOST", "value": "127.0.0.1"}]},
            "extraEnv HTTP_HOST is set by the chart itself",
        ),
        (
            {"secrets": {"kafkaGroupId": {"existingSecret": "s"}}},
            "secrets.kafkaGroupId names KAFKA_GROUP_ID, which is set by kafka.groupId",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_contradictory_values_fail_clearly(
    render_error: Callable[[dict[str, Any]], str], values: dict[str, Any], expected: str
) -> None:
    assert expected in render_error(values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"drainTimeoutSeconds": "30"}, "/drainTimeoutSeconds"),
        ({"drainTimeoutSeconds": 2.5}, "/drainTimeoutSeconds"),
        ({"store": {"kind": "mysql"}}, "/store/kind"),
        ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
        ({"secrets": {"epinApiKey": "the-key-itself"}}, "/secrets/epinApiKey"),
        ({"replicas": 2}, "replicas"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_wrong_types_fail_on_the_schema(
    render_error: Callable[[dict[str, Any]], str], values: dict[str, Any], where: str
) -> None:
    message = render_error(values)
    assert "values don't meet the specifications of the schema" in message
    assert where in message
