"""The README's run command with no key: the real embedded model (no fake), end to end.

On a fresh machine the first run builds llama-cpp-python from source (about 7 minutes on 2 cores);
pip keeps the wheel, so later runs start in seconds. Hence the long timeouts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import run
from tests.fake_model import FakeModel
from tests.helpers import ROOT, free_port, iter_sse, wait_until_answers

pytestmark = pytest.mark.slow

SETUP_LIMIT_S = 1500  # a first build from source, with room to spare on a busy machine


@dataclass
class RunCommand:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def progress(self) -> str:
        return self.err.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        found = re.findall(r"(model server|chatsvc) started \(pid (\d+)\)", self.progress())
        return {name: int(pid) for name, pid in found}

    def wait_for(self, pattern: str, limit: float) -> re.Match[str]:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.progress()):
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)  # reading a child's progress file: there is no event to await
        raise AssertionError(f"no {pattern!r} from the run command; it said:\n{self.progress()[-3000:]}")


@pytest.fixture
def run_command(tmp_path: Path) -> Iterator[RunCommand]:
    """`make run` with no key and no base URL, as a newcomer runs it, in a session of its own."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PYTEST", "UPSTREAM_"))}
    env.update(PORT=str(port), HOST="127.0.0.1", SHUTDOWN_GRACE_S="5")
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdout=stdout, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    command = RunCommand(proc, port, out, err)
    try:
        yield command
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits to be reaped.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.timeout(SETUP_LIMIT_S + 300)
def test_run_command_chats_with_the_embedded_model_and_stops_clean(run_command: RunCommand) -> None:
    ready = run_command.wait_for(r"ready on (\S+) with the embedded model (\S+)", SETUP_LIMIT_S)
    assert ready.group(1) == run_command.url
    assert ready.group(2) == "SmolLM2-135M-Instruct"
    assert "curl -N" in run_command.progress()
    assert f"the chat page: {run_command.url}/ " in run_command.progress()
    assert httpx.get(f"{run_command.url}/readyz").json()["status"] == "ready"
    # The portable build (run.py note 6): AVX2, and none of the AVX-512 or AMX kernels that a native
    # build on an AVX-512 machine turns on (the AMX ones crashed the server on its first chat).
    model_log = run.LOCAL_VENV / "model-server.log"
    features = re.findall(r"^CPU : (.*)$", model_log.read_text(errors="replace"), flags=re.MULTILINE)[-1]
    assert "AVX2 = 1" in features
    assert "AVX512" not in features
    assert "AMX" not in features

    body = {"message": "Write two sentences about the sea.", "max_tokens": 60, "temperature": 0}
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{run_command.url}/chat", json=body, headers={"X-Request-ID": "embedded-1"}) as r,
    ):
        assert r.status_code == 200
        events = [e for e in iter_sse(r) if e.comment is None]

    assert events[0].event == "meta"
    deltas = [e.data["content"] for e in events if e.event == "delta"]
    assert len(deltas) >= 5, (events[-1].data, model_log.read_text(errors="replace")[-2000:])
    assert all(deltas)
    done = events[-1]
    assert done.event == "done", done.data
    assert done.data["usage"]["source"] == "estimated"  # llama.cpp's server sends no usage
    assert done.data["usage"]["completion_tokens"] == len(deltas)

    logged = run_command.out.read_text().splitlines()
    assert any('"correlation_id": "embedded-1"' in line and '"request_completed"' in line for line in logged)

    children = run_command.pids()
    assert set(children) == {"model server", "chatsvc"}
    os.killpg(run_command.proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    run_command.proc.wait(timeout=60)
    assert "stopped" in run_command.progress()
    assert not [name for name, pid in children.items() if alive(pid)]


@pytest.mark.timeout(SETUP_LIMIT_S + 300)
def test_run_command_exits_non_zero_when_the_model_server_dies(run_command: RunCommand) -> None:
    run_command.wait_for(r"ready on ", SETUP_LIMIT_S)
    children = run_command.pids()

    os.kill(children["model server"], signal.SIGKILL)
    code = run_command.proc.wait(timeout=60)

    assert code != 0
    progress = run_command.progress()
    assert "the embedded model server exited" in progress
    assert "action:" in progress
    assert not [name for name, pid in children.items() if alive(pid)]


def test_run_command_with_a_configured_server_is_just_chatsvc(fake_model: FakeModel, tmp_path: Path) -> None:
    """With OPENAI_BASE_URL set, no local model is started: run.py becomes chatsvc itself."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PYTEST", "UPSTREAM_"))}
    env.update(PORT=str(port), OPENAI_BASE_URL=fake_model.base_url)
    err = tmp_path / "run.err"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py")], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    command = RunCommand(proc, port, tmp_path / "unused", err)
    try:
        wait_until_answers(f"{command.url}/readyz", 30, proc)
        ready = httpx.get(f"{command.url}/readyz").json()
        assert ready["model"] == "gpt-4o-mini"
        assert "embedded" not in command.progress()
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"chatsvc.py")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_long_set_up_step_says_it_is_still_working(capsys: pytest.CaptureFixture[str]) -> None:
    """The llama-cpp-python build prints nothing for minutes: `make run` says which step it is at
    and for how long, every HEARTBEAT_S (15 s; here 0.1 s, with a step of 1 s)."""
    run.run([sys.executable, "-c", "import time; time.sleep(1)"], "step 2 of 3, building", heartbeat_s=0.1)

    said = capsys.readouterr().err.splitlines()
    assert said
    assert all(
        re.fullmatch(r"chatsvc:   still working: step 2 of 3, building, 0 min 0\d s so far", line) for line in said
    )
