"""scripts/gpu_check.sh, the GPU machine's one command, rehearsed on the CPU (--dry-run: the same steps at tiny
shapes), so it runs the day a GPU is lent."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_reports_every_step(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("environment", "ok"), ("pytest -m cuda", "ok"), ("bench llama-tiny none", "ok"),
        ("bench llama-tiny int4", "ok"), ("bench llama-tiny int8", "ok"), ("bench_speculative", "ok")]
    env = report["environment"]
    assert env["torch"] and env["cuda_available"] is False and env["packages"]["torch"]
    # Every CUDA case was selected and skipped: the GPUs are hidden in a dry run.
    tests = report["pytest"]
    assert tests["tests"] >= 9 and tests["skipped"] == tests["tests"] and tests["skip_reasons"] == ["no CUDA device"]
    assert [r["weights"] for r in report["bench"]] == ["unquantized", "int4-g128", "int8"]
    assert all(r["tokens_per_s"] > 0 for r in report["bench"]) and report["bandwidth_limit_gbs"] > 0
    assert [r["name"] for r in report["speculative"]] == ["plain", "draft (int4 of target)", "lookup"]
    markdown = (tmp_path / "gpu_report.md").read_text()
    assert "| gpt-fast-serve eager | int4-g128 |" in markdown and "| lookup |" in markdown
    # The device tool returns the end of the output: the report is printed last.
    assert done.stdout.endswith(markdown + "\ngpu_check: all ok\n")
    # What the device tool brings back: at most 8 files, no folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "gpu_report.json", "gpu_report.md",
                                                          "pytest.xml"]
