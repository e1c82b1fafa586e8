"""deploy/kubernetes: every manifest against the published Kubernetes schemas (offline,
strict: an unknown field is an error), and the cross-references no schema can check:
probes on the port the daemon's config serves health on, Services on the port it
serves TLS on, mounts of volumes that exist, selectors that match the pods, the config
and policies in the ConfigMaps loaded by the daemon's own loaders, hardened containers.

The schemas come from the `kubernetes-validate` package (the dev extra), pinned to
KUBERNETES below: the oldest release the manifests are meant for (native sidecars).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml  # type: ignore[import-untyped]
from fse.core.policy import load_policies
from fse.serve.config import Settings, listen_address, load
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.daemons import THREADS, Daemon
from support.ports import free_port

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
KUBERNETES = "1.33"  # native sidecars (restartPolicy: Always init containers) are GA
HEALTH_SERVICES = {"", "fse.v1.Guard"}  # what the daemon registers (fse.serve.daemon.Health)

Doc = dict[str, Any]


def kustomization() -> Doc:
    doc: Doc = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return doc


def manifests() -> Iterator[tuple[str, Doc]]:
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            if doc is not None:
                yield name, doc


def one(kind: str, name: str | None = None) -> Doc:
    found = [d for _, d in manifests() if d["kind"] == kind]
    if name is not None:
        found = [d for d in found if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    doc: Doc = found[0]
    return doc


def pod_spec() -> Doc:
    spec: Doc = one("StatefulSet")["spec"]["template"]["spec"]
    return spec


def daemon_container() -> Doc:
    (fse,) = [c for c in pod_spec()["initContainers"] if c["name"] == "fse"]
    container: Doc = fse
    return container


def all_containers() -> list[Doc]:
    spec = pod_spec()
    return [*spec.get("initContainers", []), *spec["containers"]]


def load_toml_settings(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "fse.toml"
    path.write_text(text)
    path.chmod(0o600)  # as the daemon reads trusted files: writable by its owner only
    return load(path, {})


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    """The daemon's settings in the ConfigMap, loaded and checked by fse.serve.config."""
    return load_toml_settings(tmp_path, one("ConfigMap", "fse-config")["data"]["fse.toml"])


def tcp_ports(addresses: tuple[str, ...]) -> set[int]:
    ports = set()
    for addr in addresses:
        parsed = listen_address(addr)
        if isinstance(parsed, tuple):
            ports.add(parsed[1])
    return ports


def mounted_at(container: Doc, path: str) -> Doc | None:
    """The volume mount of `container` that `path` lies under, the deepest one."""
    best: Doc | None = None
    for mount in container.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        under = PurePosixPath(path) == mount_path or mount_path in PurePosixPath(path).parents
        if under and (best is None or len(mount["mountPath"]) > len(best["mountPath"])):
            best = mount
    return best


# -- the schemas ---------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert kustomization()["namespace"] == one("Namespace")["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(set(kustomization()["resources"])))
def test_manifests_match_the_kubernetes_schemas_strictly(name: str) -> None:
    docs = [d for n, d in manifests() if n == name]
    assert docs, f"{name} holds no object"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The check above would catch a typo: a field the schema does not know."""
    service = one("Service", "fse")
    bad = {**service, "spec": {**service["spec"], "selectr": {"a": "b"}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


# -- what the daemon reads -------------------------------------------------------------


def test_the_configmap_is_a_valid_daemon_config(settings: Settings) -> None:
    assert settings.tls.cert is not None and settings.tls.key is not None
    assert settings.auth.tokens_file is not None
    assert any(a.startswith("unix:") for a in settings.server.listen)
    assert tcp_ports(settings.server.listen), "no TCP listener for the Services"
    assert tcp_ports(settings.server.health_listen), "no health listener for the probes"
    assert settings.model.path is not None and settings.model.gpu_layers == 0


def test_the_policies_configmap_loads_with_the_daemons_loader(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir(mode=0o755)
    data = one("ConfigMap", "fse-policies")["data"]
    for name, text in data.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o444)  # the volume's defaultMode
    policies = load_policies(folder)
    assert {Path(n).stem for n in data} <= set(policies)


def test_every_path_in_the_config_is_mounted(settings: Settings) -> None:
    fse = daemon_container()
    config_arg = fse["args"][fse["args"].index("--config") + 1]
    config_mount = mounted_at(fse, config_arg)
    assert config_mount is not None and config_mount.get("readOnly")
    assert config_mount["subPath"] == "fse.toml"
    read_only = {
        "tls.cert": str(settings.tls.cert),
        "tls.key": str(settings.tls.key),
        "auth.tokens_file": str(settings.auth.tokens_file),
        "policies.dir": str(settings.policies.dir),
    }
    for key, path in read_only.items():
        mount = mounted_at(fse, path)
        assert mount is not None and mount.get("readOnly"), f"{key} {path}: no read-only mount"
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    tls = volumes[mounted_at(fse, str(settings.tls.cert))["name"]]  # type: ignore[index]
    assert {
        PurePosixPath(str(settings.tls.cert)).name,
        PurePosixPath(str(settings.tls.key)).name,
    } == {
        "tls.crt",
        "tls.key",
    } and "secret" in tls  # the keys of a kubernetes.io/tls Secret
    audit = mounted_at(fse, str(settings.audit.path))
    assert audit is not None and not audit.get("readOnly")
    claims = {c["metadata"]["name"] for c in one("StatefulSet")["spec"]["volumeClaimTemplates"]}
    assert audit["name"] in claims, "the audit log must be on the pod's own claim"
    # The audit log's directory (0700, made by the audit-dir init container) is below the
    # claim's root, which fsGroup makes group-writable.
    assert PurePosixPath(str(settings.audit.path)).parent != PurePosixPath(audit["mountPath"])
    (prepare,) = [c for c in pod_spec()["initContainers"] if c["name"] == "audit-dir"]
    assert str(PurePosixPath(str(settings.audit.path)).parent) in " ".join(prepare["command"])
    model = str(settings.model.path)
    assert model.startswith("/opt/fse/cache/") and mounted_at(fse, model) is None  # the image's
    assert "FSE_CACHE_DIR=/opt/fse/cache" in CONTAINERFILE.read_text()


def test_the_unix_socket_is_shared_with_the_app(settings: Settings) -> None:
    fse = daemon_container()
    sockets = [a.removeprefix("unix:") for a in settings.server.listen if a.startswith("unix:")]
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    for path in sockets:
        mount = mounted_at(fse, path)
        assert mount is not None and not mount.get("readOnly")
        assert "emptyDir" in volumes[mount["name"]]
        (app,) = pod_spec()["containers"]
        app_mount = mounted_at(app, path)
        assert app_mount is not None and app_mount["name"] == mount["name"]
        assert f"unix:{path}" in " ".join(app["command"])
    tmpdir = {e["name"]: e["value"] for e in fse["env"]}["TMPDIR"]
    assert mounted_at(fse, tmpdir) is not None  # the relay's private sockets: writable


def test_every_mounted_volume_exists() -> None:
    volumes = {v["name"] for v in pod_spec()["volumes"]}
    claims = {c["metadata"]["name"] for c in one("StatefulSet")["spec"]["volumeClaimTemplates"]}
    assert not volumes & claims
    for container in all_containers():
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes | claims, f"{container['name']}: {mount['name']}"
    used = {m["name"] for c in all_containers() for m in c.get("volumeMounts", [])}
    assert volumes | claims == used, "a volume nobody mounts"


def test_probes_ask_the_daemons_health_port(settings: Settings) -> None:
    fse = daemon_container()
    health_ports = tcp_ports(settings.server.health_listen)
    container_ports = {p["containerPort"] for p in fse["ports"]}
    assert fse["restartPolicy"] == "Always"  # a native sidecar: probes are allowed on it
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = fse[kind]["grpc"]
        assert probe["port"] in health_ports & container_ports, kind
        assert probe.get("service", "") in HEALTH_SERVICES, kind
    # The TLS listener is not what the probes use: kubelet's grpc probes speak plain text.
    assert not health_ports & tcp_ports(settings.server.listen)


def test_services_reach_the_tls_listener(settings: Settings) -> None:
    fse = daemon_container()
    ports = {p["name"]: p["containerPort"] for p in fse["ports"]}
    labels = one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for name in ("fse", "fse-headless"):
        service = one("Service", name)
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), name
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            number = ports[target] if isinstance(target, str) else target
            assert number in tcp_ports(settings.server.listen), f"{name}: {target}"
    assert one("Service", "fse-headless")["spec"]["clusterIP"] == "None"
    assert one("StatefulSet")["spec"]["serviceName"] == "fse-headless"


def test_selectors_match_the_pods() -> None:
    statefulset = one("StatefulSet")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    for selector in (
        statefulset["spec"]["selector"]["matchLabels"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        *(c["labelSelector"]["matchLabels"] for c in pod_spec()["topologySpreadConstraints"]),
    ):
        assert selector.items() <= labels.items()
    names = {p["name"] for p in daemon_container()["ports"]}
    for rule in one("NetworkPolicy")["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in names


def test_containers_are_hardened() -> None:
    pod = pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in all_containers():
        sc = container["securityContext"]
        name = container["name"]
        assert sc["runAsNonRoot"] is True, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert container["resources"]["limits"]["memory"], name


def test_resources_and_grace_fit_the_config(settings: Settings) -> None:
    resources = daemon_container()["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert int(resources["limits"]["cpu"]) == settings.server.threads  # whole CPUs
    memory = resources["limits"]["memory"]
    assert memory.endswith("Gi") and float(memory[:-2]) * 1024 >= 241 + 208  # benchmarks.md
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace >= settings.server.drain_seconds + 20


def test_the_image_runs_the_daemon_as_the_manifests_do() -> None:
    text = CONTAINERFILE.read_text()
    assert 'ENTRYPOINT ["fse"]' in text and "USER 10001" in text
    assert pod_spec()["securityContext"]["runAsUser"] == 10001
    images = {c["image"] for c in all_containers()}
    (override,) = kustomization()["images"]
    assert {i.rpartition(":")[0] for i in images} == {override["name"]}


# -- the health port the probes use, on a real daemon ----------------------------------


def test_the_health_port_serves_health_and_nothing_else(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(*THREADS, "--health-listen", f"127.0.0.1:{port}")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in HEALTH_SERVICES:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            fse_pb2_grpc.GuardStub(channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        daemon.process.send_signal(signal.SIGTERM)
        status = None
        for _ in range(100):  # NOT_SERVING from the first moment of the drain
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
            except grpc.RpcError:
                break
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
    assert daemon.process.wait(60) == 0
    assert status in (None, health_pb2.HealthCheckResponse.NOT_SERVING)
