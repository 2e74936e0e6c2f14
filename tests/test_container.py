"""The image: built from the Dockerfile, run, probed, stopped mid-stream, removed; and the
Dockerfile and Kubernetes manifests checked by their linters.

The engine: `../shared/tools/container-engine.sh` (rootful podman with a local stand-in for
python:3.11-slim) where it exists; otherwise a docker engine if one answers; otherwise the tests
are skipped, saying why. With podman the container reaches the fake model on the host's loopback
through slirp4netns (`allow_host_loopback`: 10.0.2.2 inside is 127.0.0.1 outside) and its port is
published on 127.0.0.1; with docker it shares the host's network and listens on 127.0.0.1 itself.
Either way nothing but loopback is ever addressed on the host. (This machine has no docker engine:
the docker path has not run here.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_model import FakeModel
from tests.helpers import ROOT, Event, free_port, iter_sse, wait_until_answers
from tests.spec import validate

pytestmark = pytest.mark.slow

ENGINE_TOOL = ROOT.parent / "shared" / "tools" / "container-engine.sh"
GRACE_S = 2
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


@dataclass
class Engine:
    command: str
    env: dict[str, str]

    @property
    def podman(self) -> bool:
        return self.command == "podman"

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.command, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{self.command} {' '.join(args)} failed: {result.stderr[-2000:]}")
        return result


@pytest.fixture(scope="module")
def engine() -> Engine:
    if ENGINE_TOOL.exists():
        prepared = subprocess.run(["bash", str(ENGINE_TOOL)], capture_output=True, text=True, timeout=1200, check=False)
        assert prepared.returncode == 0, f"container-engine.sh failed: {prepared.stderr[-2000:]}"
        env = dict(os.environ)
        for name, value in re.findall(r"(\w+)='([^']*)'", prepared.stdout):
            env[name] = value
        return Engine("podman", env)
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0:
        return Engine("docker", dict(os.environ))
    pytest.skip("no container engine: ../shared/tools/container-engine.sh is absent and no docker engine answers")


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[str]:
    tag = f"localhost/chatsvc:test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    flags = ["--pull=never", "--format", "docker"] if engine.podman else []  # podman: keep HEALTHCHECK
    engine("build", *flags, "-t", tag, str(ROOT), timeout=900)
    size = engine("image", "inspect", tag, "--format", "{{.Size}}").stdout.strip()
    print(f"\nimage {tag}: built in {time.monotonic() - started:.1f} s, {int(size) / 1e6:.0f} MB")
    yield tag
    engine("rmi", "-f", tag, check=False)


@dataclass
class Container:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def container(engine: Engine, image: str, fake_model: FakeModel) -> Iterator[Container]:
    name = f"chatsvc-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    if engine.podman:
        network = ["--network", "slirp4netns:allow_host_loopback=true", "-p", f"127.0.0.1:{port}:8000"]
        model_host = "10.0.2.2"
    else:
        network = ["--network", "host", "-e", "HOST=127.0.0.1", "-e", f"PORT={port}"]
        model_host = "127.0.0.1"
    engine(
        "run", "-d", "--name", name, "--read-only", *network,
        "-e", f"OPENAI_BASE_URL=http://{model_host}:{fake_model.port}/v1",
        "-e", f"SHUTDOWN_GRACE_S={GRACE_S}",
        "-e", "IDLE_TIMEOUT_S=60",
        image,
    )  # fmt: skip
    box = Container(name, port)
    try:
        wait_until_answers(f"{box.url}/healthz", 60)
        yield box
    finally:
        engine("rm", "-f", name, check=False)


def stream(url: str, message: str) -> Iterator[Event]:
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{url}/chat", json={"message": message}) as response,
    ):
        assert response.status_code == 200
        yield from (e for e in iter_sse(response) if e.comment is None)


def healthy(engine: Engine, box: Container) -> bool:
    """The image's own HEALTHCHECK: run now by podman; with docker, its status once reported."""
    if engine.podman:
        return engine("healthcheck", "run", box.name, check=False).returncode == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = engine("inspect", box.name, "--format", "{{.State.Health.Status}}").stdout.strip()
        if status != "starting":
            return status == "healthy"
        time.sleep(1)  # docker runs the check on its own interval
    return False


@pytest.mark.container
def test_image_serves_streams_and_probes_as_non_root(engine: Engine, container: Container) -> None:
    assert httpx.get(f"{container.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{container.url}/readyz").status_code == 200

    events = list(stream(container.url, "fake:deltas=20"))
    assert events[0].event == "meta"
    assert "".join(e.data["content"] for e in events if e.event == "delta") == "".join(f"w{i} " for i in range(20))
    assert events[-1].event == "done"

    assert healthy(engine, container)
    assert engine("exec", container.name, "id", "-u").stdout.strip() == "10001"
    assert engine("exec", container.name, "id", "-g").stdout.strip() == "10001"
    app_files = engine("exec", container.name, "ls", "-A", "/app").stdout.split()
    assert sorted(app_files) == [
        "ai_sdk.py",
        "chat.html",
        "chatsvc.py",
        "http_protocol.py",
        "logging_conf.py",
        "metrics.py",
        "openapi.yaml",
        "redis_store.py",
        "requirements.txt",
        "served_files.py",
        "tracing.py",
        "worker_metrics.py",
    ]
    pid1 = engine("exec", container.name, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert pid1[:2] == ["python", "chatsvc.py"], pid1


@pytest.mark.container
def test_stop_drains_the_stream_in_flight_and_exits_0(engine: Engine, container: Container) -> None:
    events = stream(container.url, "fake:deltas=5,stall_after=1")
    assert next(events).event == "meta"
    assert next(events).event == "delta"

    stopped: dict[str, Any] = {}

    def stop() -> None:
        begun = time.monotonic()
        stopped["result"] = engine("stop", "-t", "30", container.name, check=False)
        stopped["seconds"] = time.monotonic() - begun

    stopper = threading.Thread(target=stop)
    stopper.start()
    rest = list(events)  # the stall outlives the grace: the drain must end it
    stopper.join(timeout=60)

    assert rest[-1].event == "error"
    validate("ErrorEvent", rest[-1].data)
    assert rest[-1].data["code"] == "shutting_down"
    assert stopped["result"].returncode == 0
    assert stopped["seconds"] < 30  # podman's own kill timeout was never reached
    exit_code = engine("inspect", container.name, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert exit_code == "0"


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_validate_against_the_schemas(tmp_path: Path) -> None:
    manifests = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    assert {m.name for m in manifests} >= {"deployment.yaml", "service.yaml", "hpa.yaml"}
    ok = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", *map(str, manifests)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # The validator does reject a broken manifest (a misspelt field, under --strict).
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "deploy/kubernetes/deployment.yaml").read_text().replace("replicas:", "replica:"))
    bad = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(broken)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0


def test_deployment_follows_the_services_contract() -> None:
    import yaml

    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (box,) = pod["containers"]
    env = {e["name"]: e for e in box["env"]}

    assert spec["replicas"] >= 2
    assert box["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert box["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] > float(env["SHUTDOWN_GRACE_S"]["value"]) + 5
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "chatsvc-secrets"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"requests", "limits"} <= set(box["resources"])


def test_the_readiness_probe_outwaits_what_readyz_waits_on() -> None:
    """Bug: the probe gave /readyz 1 s with failureThreshold 1, while /readyz may wait on the store
    (RESUME_STORE_TIMEOUT_S) and then the model server (CONNECT_TIMEOUT_S): one slow Redis answer
    took every pod out at once. Fix: the probe waits longer than both, and takes two misses, which
    still come well inside the drain's grace."""
    import yaml

    from chatsvc import Settings

    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    (box,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in box["env"]}
    probe = box["readinessProbe"]
    defaults = Settings.model_fields
    waits = defaults["RESUME_STORE_TIMEOUT_S"].default + defaults["CONNECT_TIMEOUT_S"].default
    assert probe["timeoutSeconds"] > waits
    assert probe["failureThreshold"] >= 2
    assert probe["failureThreshold"] * probe["periodSeconds"] < float(env["SHUTDOWN_GRACE_S"])


def test_a_read_only_root_leaves_the_workers_a_writable_tmp() -> None:
    """Bug: WORKERS > 1 keeps prometheus-client's multiprocess files under the temporary directory,
    which the manifest's read-only root refused. Fix: an emptyDir mounted at /tmp."""
    import yaml

    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (box,) = pod["containers"]
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in box.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # noqa: S108 (the path in the pod, not ours)


def test_the_redis_wiring_matches_across_the_manifests() -> None:
    """RESUME_STORE comes from the Secret (its URL may hold a password); the example Secret's URL
    names the try-it-out Redis Service of redis.yaml, which only chatsvc's pods may reach."""
    import yaml

    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    (box,) = deployment["spec"]["template"]["spec"]["containers"]
    ref = {e["name"]: e for e in box["env"]}["RESUME_STORE"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["optional"]) == ("chatsvc-secrets", True)  # absent: memory, per pod
    secret = yaml.safe_load((ROOT / "deploy/kubernetes/secret.example.yaml").read_text())
    url = secret["stringData"][ref["key"]]
    redis_docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/redis.yaml").read_text()))
    service = next(d for d in redis_docs if d["kind"] == "Service")
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    policy = next(d for d in redis_docs if d["kind"] == "NetworkPolicy")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed == deployment["spec"]["selector"]["matchLabels"]
