"""scripts/soak.py, short, against its own TorchServe: valid traffic, the whole hostile corpus, a killed worker."""
import subprocess
import sys

import pytest

from test_serve import MODEL_CONFIG, ROOT, served


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory, request):
    yield from served(tiny_checkpoint, tmp_path_factory.mktemp("soak"), request, {"gpt-fast": MODEL_CONFIG})


def test_short_soak_passes(server):
    ports = {kind: server.env[f"GFS_{kind}_PORT"] for kind in ("INFERENCE", "MANAGEMENT")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--minutes", "0.2", "--clients", "6",
                           "--port", ports["INFERENCE"], "--management-port", ports["MANAGEMENT"],
                           "--run-dir", str(server.run_dir)], capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    report = done.stdout
    assert "- result: PASS" in report
    assert "answered other than expected: 0" in report and "differed from the same request alone: 0" in report
    assert "worker restarts: 1 (before the kill: 0)" in report
