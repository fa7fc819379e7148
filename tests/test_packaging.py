"""The package as a user installs it: a wheel built from the repository, ``agentd[server]`` in a
fresh virtualenv, and ``agentd demo`` / ``agentd serve`` run from a directory far from the checkout.

The repository's editable install hides what these catch: files missing from the wheel, and a
default app that imports only when the working directory is the checkout. The venv is built once
per module (the slow part); every command runs with the temporary directory as its working
directory and without PYTHONPATH, so nothing of the repository is importable.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lists the agents through the installed client; waits for the server with wait_for_ready.
LIST_AGENTS = """
import sys
import agentd.client
from agentd.client import SyncAgentdClient
from agentd.v1 import agent_service_pb2

with SyncAgentdClient(sys.argv[1]) as client:
    reply = client.agents.ListAgents(agent_service_pb2.ListAgentsRequest(), wait_for_ready=True, timeout=30)
print(" ".join(sorted(agent.name for agent in reply.agents)))
print(agentd.client.__file__)
"""

# A user's own app, served from the working directory with --app myapp:app.
USER_APP = '''
from agentd.server import Agent, App, Script, say

greeter = Agent(name="greeter", instructions="Greet the user.")
app = App(agents=[greeter], offline_script=Script.of(say("Hello from the user's own app.")))
'''


@dataclass
class Installed:
    """A virtualenv holding the built wheel, and an empty working directory outside the repository."""

    venv: Path
    wheel: Path
    workdir: Path
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def agentd(self) -> Path:
        return self.venv / "bin" / "agentd"

    def run(self, *args: str | Path, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args], cwd=cwd or self.workdir, env=self.env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )


def _clean_env() -> dict[str, str]:
    """The caller's environment minus whatever could point the venv at the repository or change the app."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "OPENAI_API_KEY", "OPENAI_BASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("AGENTD_")}
    return {**env, "COLUMNS": "200", "PYTHONNOUSERSITE": "1"}


def _check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("packaging")
    assert not base.resolve().is_relative_to(ROOT), "the venv and working directory must be outside the repository"
    dist, venv, workdir = base / "dist", base / "venv", base / "work"
    workdir.mkdir()
    env = _clean_env()
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(ROOT)]
    _check(subprocess.run(build, cwd=base, env=env, capture_output=True, text=True, timeout=600))
    (wheel,) = dist.glob("agentd-*.whl")
    _check(subprocess.run([sys.executable, "-m", "venv", str(venv)], cwd=base, env=env, capture_output=True,
                          text=True, timeout=120))
    install = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{wheel}[server]"]
    _check(subprocess.run(install, cwd=base, env=env, capture_output=True, text=True, timeout=600))
    return Installed(venv=venv, wheel=wheel, workdir=workdir, env=env)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_wheel_ships_the_example_app_and_the_venv_imports_it_from_itself(installed: Installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert {"agentd/examples/__init__.py", "agentd/examples/support.py", "agentd/cli/main.py",
            "agentd/server/app.py", "agentd/v1/agent_service_pb2.py"} <= names
    code = "import agentd.examples.support as m, agentd.server as s; print(m.__file__); print(s.__file__)"
    out = _check(installed.run(installed.python, "-c", code, timeout=60)).stdout
    for path in out.split():
        assert Path(path).resolve().is_relative_to(installed.venv.resolve()), f"{path} is not the installed copy"


def test_demo_runs_from_an_empty_directory(installed: Installed):
    result = _check(installed.run(installed.agentd, "demo", timeout=90))
    assert "⇢ handoff triage → billing" in result.stdout
    assert "← issue_refund: refund of 49.00 EUR" in result.stdout
    assert "✔ completed by billing" in result.stdout
    assert (installed.workdir / ".agentd" / "demo.db").exists()


def test_demo_serves_the_users_own_app_from_the_working_directory(installed: Installed, tmp_path: Path):
    (tmp_path / "myapp.py").write_text(USER_APP)
    result = _check(installed.run(installed.agentd, "demo", "--app", "myapp:app", "--agent", "greeter",
                                  "--input", "hi", cwd=tmp_path, timeout=90))
    assert "greeter: Hello from the user's own app." in result.stdout
    assert "✔ completed by greeter" in result.stdout


def test_demo_fails_at_once_with_the_servers_error_when_the_server_cannot_start(installed: Installed):
    # The demo waits up to 30 s for a server that is alive; one that exited must fail it at once.
    result = installed.run(installed.agentd, "demo", "--app", "nonexistent.module:app", timeout=25)
    assert result.returncode != 0
    assert "the server stopped (exit code 2) before it was ready" in result.stderr
    assert "cannot import app module 'nonexistent.module'" in result.stderr


def test_serve_asked_for_uvloop_without_it_says_what_to_install(installed: Installed):
    # The wheel's [server] extra has no uvloop: "auto" runs on asyncio (the tests above), "uvloop" refuses.
    result = subprocess.run(
        [str(installed.agentd), "serve", "--port", "0", "--store", "memory"], cwd=installed.workdir,
        env={**installed.env, "AGENTD_EVENT_LOOP": "uvloop"}, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "AGENTD_EVENT_LOOP=uvloop but uvloop is not installed: pip install uvloop" in result.stderr


def test_serve_answers_through_the_installed_client_and_stops_cleanly_on_sigterm(
    installed: Installed, free_port: int, tmp_path: Path,
):
    target = f"127.0.0.1:{free_port}"
    server_log = tmp_path / "serve.log"
    with open(server_log, "wb") as log:
        server = subprocess.Popen(
            [str(installed.agentd), "serve", "--port", str(free_port), "--store", "memory"],
            cwd=installed.workdir, env=installed.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
    try:
        listed = installed.run(installed.python, "-c", LIST_AGENTS, target, timeout=60)
        assert listed.returncode == 0, f"{listed.stderr}\nserver log:\n{server_log.read_text()}"
        names, client_file = listed.stdout.splitlines()
        assert names == "agents/billing agents/triage"
        assert Path(client_file).resolve().is_relative_to(installed.venv.resolve())
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server_log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert "Traceback" not in server_log.read_text()
