"""deploy/kubernetes/ and the Dockerfile: every manifest is valid against the Kubernetes
OpenAPI schemas (offline: kubernetes-validate ships them), and what the manifests say
about the router agrees with the router: the container arguments parse with the real
`grayroute serve` parser, probes hit the admin endpoints that need no token, ports,
volumes, users and the termination grace period fit the flags.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from router.admin import OPEN_PATHS
from router.cli import parse_serve
from router.config import Settings, parse_hostport
from router.fleet import EtcdLocation, is_etcd_url
from router.rules import load_snapshot_bytes
from router.supervisor import WORKER_EXIT_MARGIN

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.30"  # the oldest release the manifests promise to work on


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in manifests() if d["kind"] == kind]


def test_every_manifest_is_valid_kubernetes() -> None:
    docs = manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for path, doc in docs:
        try:
            # strict: a misspelt or misplaced field is an error, as `kubectl --validate` says
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {exc.message}")


def test_the_validator_rejects_what_the_api_server_would() -> None:
    (_, deployment), *_ = of_kind("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def container_settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The container's arguments through the real command line (the image's entry point
    is `grayroute`), with the environment the manifest gives it."""
    for env in container.get("env", []):
        # Secrets are not here: any value stands for one (the flags only need it set).
        monkeypatch.setenv(env["name"], env.get("value", "from-a-secret"))
    return parse_serve(container["args"])


def dockerfile() -> dict[str, Any]:
    text = (ROOT / "Dockerfile").read_text()
    final = text.rsplit("\nFROM ", 1)[1]  # the last stage is the image
    joined = re.sub(r"\\\n\s*", " ", final)
    fields: dict[str, Any] = {}
    for line in joined.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("USER", "EXPOSE", "ENTRYPOINT", "CMD"):
            fields[word] = rest.strip()
    return fields


def image_user() -> int:
    return int(dockerfile()["USER"].split(":")[0])


@pytest.mark.parametrize(
    "path", sorted(DEPLOY.rglob("deployment.yaml")), ids=lambda p: p.parent.name
)
def test_deployment_agrees_with_the_router(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (deployment,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    settings = container_settings(container, monkeypatch)

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.listen_addr == ("0.0.0.0", ports["http"])
    admin_host, admin_port = settings.admin_addr
    assert admin_host == "0.0.0.0" and admin_port == ports["admin"]  # kubelet probes pod IPs
    assert settings.admin_token  # required off loopback: from the Secret

    # Probes need no token: only the admin's open paths, on the admin port.
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in [*probes.values(), container["startupProbe"]["httpGet"]]:
        assert probe["path"] in OPEN_PATHS
        assert ports.get(probe["port"], probe["port"]) == admin_port

    # Stopping: the preStop wait, then the drain, then the workers' exit, all within grace.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + settings.drain_timeout + WORKER_EXIT_MARGIN
    assert pod["terminationGracePeriodSeconds"] >= needed

    # Not root, nothing written outside the volumes, the state directory on one.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user() != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = mounts[settings.state_dir]
    assert not state.get("readOnly") and "emptyDir" in volumes[state["name"]]

    requests = container["resources"]["requests"]
    assert "memory" in requests and settings.workers <= float(requests["cpu"])

    if is_etcd_url(settings.rules_path):
        location = EtcdLocation.parse(settings.rules_path)
        assert len(location.endpoints) == 3  # every member: the client moves on when one is down
        return
    # File mode: the rule file is the ConfigMap's key, mounted read-only, and valid.
    rules = Path(settings.rules_path)
    mount = mounts[str(rules.parent)]
    assert mount["readOnly"] is True
    config_map_name = volumes[mount["name"]]["configMap"]["name"]
    (config_map,) = [d for p, d in of_kind("ConfigMap") if d["metadata"]["name"] == config_map_name]
    text = config_map["data"][rules.name]
    snapshot = load_snapshot_bytes(text.encode(), rules.name)
    assert not snapshot.warnings, snapshot.warnings


def test_services_and_budget_select_the_routers() -> None:
    pods = {
        tuple(sorted(d["spec"]["template"]["metadata"]["labels"].items()))
        for _, d in of_kind("Deployment")
    }
    (labels,) = pods  # both modes run the same pods
    ports: set[str] = set()
    for _, d in of_kind("Deployment"):
        ports |= {p["name"] for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}
    routers = [d for _, d in of_kind("Service") if d["metadata"]["name"].startswith("grayroute")]
    assert routers
    for service in routers:
        assert service["spec"]["selector"].items() <= dict(labels).items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    (pdb,) = [d for _, d in of_kind("PodDisruptionBudget")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dict(labels).items()
    assert 0 < pdb["spec"]["minAvailable"] < 3

    versions = [d for _, d in of_kind("Service") if d["metadata"]["name"].startswith("orders")]
    assert versions and all(v["spec"]["clusterIP"] == "None" for v in versions)  # headless
    # The rules in file mode name exactly these Services.
    (config_map,) = [d for _, d in of_kind("ConfigMap")]
    hosts = set(
        re.findall(r"([\w-]+)\.shop\.svc\.cluster\.local", config_map["data"]["rules.yaml"])
    )
    assert hosts == {v["metadata"]["name"] for v in versions}


def test_dockerfile_runs_grayroute_as_the_manifests_expect(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = dockerfile()
    assert yaml.safe_load(fields["ENTRYPOINT"]) == ["grayroute"]
    exposed = {int(p) for p in fields["EXPOSE"].split()}
    cmd = yaml.safe_load(fields["CMD"])
    settings = parse_serve(cmd)  # the default command is a valid `grayroute serve`
    assert parse_hostport(settings.listen, "--listen")[1] in exposed
    assert settings.admin_addr[1] in exposed
    assert settings.state_dir == "/var/lib/grayroute"
    assert image_user() != 0
    text = (ROOT / "Dockerfile").read_text()
    for copied in re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'grayroute = "router.cli:main"' in scripts
