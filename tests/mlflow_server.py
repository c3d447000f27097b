"""A real `mlflow server` for tests (SQLite backend, proxied artifacts) on 127.0.0.1, stopped with its
process group: the server and the workers it started, nothing else. With `admin=(user, password)` it is
`mlflow server --app-name basic-auth`: its own user DB and config (MLFLOW_AUTH_CONFIG_PATH) under root, that
admin account created at start, READ for every other account, and nothing served without credentials."""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ray_util import free_port


class MlflowServer:
    def __init__(self, root: Path, admin: tuple[str, str] | None = None):
        self.root, self.port = Path(root), free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = self.root / "artifacts"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD"):
            env.pop(var, None)
        app = []
        if admin:
            config = self.root / "basic_auth.ini"
            config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.root / 'auth.db'}\n"
                              f"admin_username = {admin[0]}\nadmin_password = {admin[1]}\n"
                              f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            config.chmod(0o600)
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)  # the app's CSRF protection needs one
            app = ["--app-name", "basic-auth"]
        self._log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", *app], cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        self.pid = self.proc.pid

    def wait_healthy(self, timeout: float = 180.0) -> None:
        """Until /health answers (about 40 s on 2 cores); a server that exits or never answers fails with its log."""
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s: {self.log_tail()}")
            time.sleep(1)

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
