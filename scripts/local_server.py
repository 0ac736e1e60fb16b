"""A private TorchServe on 127.0.0.1 for tests and benchmarks: free ports, its own run dir, archive + start + stop
through scripts/archive.sh and scripts/serve.sh (so they are what gets exercised)."""
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Optional

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalServer:
    def __init__(self, run_dir: Path, name: str = "gpt-fast", start_timeout: int = 180):
        ports = free_ports(5)
        self.run_dir, self.name = Path(run_dir), name
        self.predictions = f"http://127.0.0.1:{ports[0]}/predictions"
        self.url = f"{self.predictions}/{name}"
        self.openai_url = f"{self.url}/1.0/v1"  # the OpenAI-compatible API's base URL (archive.sh's version 1.0)
        self.metrics_url = f"http://127.0.0.1:{ports[2]}/metrics"
        self.env = {"GFS_RUN_DIR": str(run_dir), "GFS_MODEL_STORE": str(self.run_dir / "model_store"),
                    "GFS_START_TIMEOUT": str(start_timeout)}
        for kind, port in zip(("INFERENCE", "MANAGEMENT", "METRICS", "GRPC_INFERENCE", "GRPC_MANAGEMENT"), ports):
            self.env[f"GFS_{kind}_PORT"] = str(port)

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "scripts" / args[0]), *args[1:]], env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=timeout)

    def archive_and_start(self, checkpoint: Path, config: Path, more: tuple[tuple[str, Path], ...] = (),
                          in_place: bool = False) -> None:
        """Serve `checkpoint` with `config` as self.name, plus (name, config) more models of it."""
        for name, conf in [(self.name, config), *more]:
            self.archive(checkpoint, conf, name, in_place)
        self.start()

    def archive(self, checkpoint: Path, config: Path, name: Optional[str] = None, in_place: bool = False) -> None:
        """in_place: archive.sh --no-archive (no tarball of a big checkpoint to compress now and unpack at start)."""
        self._run("archive.sh", str(checkpoint), "--name", name or self.name, "--config", str(config),
                  *(["--no-archive"] if in_place else []))

    def start(self) -> None:
        self._run("serve.sh", "start")

    def _run(self, *args: str) -> None:
        done = self.script(*args, timeout=3600)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed:\n{done.stdout}{done.stderr}")

    def stop(self) -> subprocess.CompletedProcess:
        return self.script("serve.sh", "stop")

    @property
    def headers(self) -> dict:
        key = json.loads((self.run_dir / "key_file.json").read_text())["inference"]["key"]
        return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(self, body, model: Optional[str] = None, path: str = "", **kw) -> requests.Response:
        """POST to /predictions/<model or ours>, or to `path` (e.g. "completions") under the OpenAI API's base."""
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        url = f"{self.openai_url}/{path}" if path else f"{self.predictions}/{model}" if model else self.url
        return requests.post(url, data=data, headers=kw.pop("headers", self.headers), timeout=300, **kw)

    def log(self, name: str) -> str:
        path = self.run_dir / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""
