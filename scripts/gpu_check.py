"""The GPU machine's check, in one run of a few minutes: environment, the CUDA tests, the benchmarks, one report.

    bash scripts/gpu_check.sh                 # on the GPU machine: writes $OUT/gpu_report.md and gpu_report.json
    bash scripts/gpu_check.sh --steps bench --quantize int8 --budget 150   # a rerun of what did not finish
    bash scripts/gpu_check.sh --dry-run       # anywhere: the same steps on the CPU at tiny shapes (tests run it)

Steps, each a subprocess under its own time limit inside one overall budget, most important first, so a slow
compile costs the steps after it, never the report (rewritten after every step):
  1. environment: GPU, driver, torch, CUDA, the packages gpt-fast-serve needs and which the machine lacks;
  2. `pytest -m cuda` (tests/test_cuda.py): compiled (CUDA graphs) decode == eager for bf16/int8/int4, no
     recompiles or new captures after warm-up, int4 packing, speculative == plain, prefix-cache hits == misses,
     the serving loop, batch and kv buckets, 2-rank tensor parallelism (2 GPUs);
  3. scripts/bench.py at Llama 3.1 8B's shape, random weights, batch 1, compiled: bf16, int4-g128, int8, each
     against the measured device copy bandwidth (bytes read + written by a large copy);
  4. scripts/bench_speculative.py's GPU row (the bf16 target with its own int4 as draft, and prompt lookup).
Files in OUT (the device tool brings back 8 at most): gpu_report.md, gpu_report.json, gpu_check.log, pytest.xml.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the device image is known to hold and what gpt-fast-serve asks for (requirements*.txt), checked by name.
PACKAGES = ["torch", "triton", "sentencepiece", "tiktoken", "tokenizers", "safetensors", "pyyaml", "huggingface_hub",
            "jinja2", "gguf", "ninja", "transformers", "accelerate", "pytest", "requests", "torchserve",
            "torch-model-archiver", "openai"]
# Anchors for Llama 3.1 8B batch-1 decode on one H100 (torchao, tok/s): the yardstick.
ANCHORS = {"bf16": 127, "int8": 199, "int4-g128": 241}


class Check:
    def __init__(self, out: Path, dry_run: bool, budget: float):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget
        self.started = time.monotonic()
        self.log = (out / "gpu_check.log").open("w")
        self.report: dict = {"dry_run": dry_run, "budget_s": budget, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "steps": [], "environment": {}, "pytest": {}, "bench": [], "speculative": []}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def run(self, name: str, cmd: list[str], cap: float) -> tuple[str, str]:
        """Run cmd with at most `cap` seconds (less if the budget ends first); (status, output)."""
        left = self.deadline - time.monotonic()
        step = {"name": name, "command": " ".join(cmd)}
        if left < 15:
            step.update(status="skipped", seconds=0.0, detail="out of time budget")
            self.report["steps"].append(step)
            self.say(f"== {name}: skipped (out of time budget)")
            return "skipped", ""
        limit = min(cap, left)
        self.say(f"== {name} (limit {limit:.0f} s): {step['command']}")
        t0, cpu0 = time.monotonic(), cpu_seconds()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)  # its own process group: compile workers die with it
        try:
            output, _ = proc.communicate(timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = f"timed out after {limit:.0f} s"
        self.log.write(output)
        step.update(status=status, seconds=round(time.monotonic() - t0, 1), cpu_s=round(cpu_seconds() - cpu0, 1))
        if status != "ok":
            step["detail"] = output[-2000:]
            print(output[-3000:], flush=True)
        self.report["steps"].append(step)
        self.say(f"== {name}: {status} in {step['seconds']} s")
        self.write()
        return status, output

    def write(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu_report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "gpu_report.md").write_text(markdown(self.report))


def cpu_seconds() -> float:
    """CPU time of the finished child processes (compiling is CPU work, on a GPU machine too)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def environment() -> dict:
    """GPU, driver, torch and CUDA versions, and which packages are installed."""
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "java": shutil.which("java") is not None}
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    try:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpus=torch.cuda.device_count(), gpu=props.name, capability=f"{props.major}.{props.minor}",
                       sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       cudnn=torch.backends.cudnn.version())
    except Exception as e:  # noqa: BLE001 (a broken torch is what this report is for)
        env["torch_error"] = repr(e)
    env["packages"] = {}
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    required = [re.split(r"[=<>~ ;\[]", line)[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-"))]
    env["serve_missing"] = [name for name in required if not installed(name)]
    return env


def installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def pytest_summary(junit: Path, output: str) -> dict:
    """Counts, the tests that did not pass, skip reasons, and modules that could not be imported (collection).
    Without the junit file (pytest was stopped at its time limit), what the verbose output shows had finished."""
    if not junit.exists():
        results = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, re.M)
        count = lambda outcome: sum(r == outcome for _, r in results)  # noqa: E731
        return {"tests": len(results), "failures": count("FAILED"), "errors": count("ERROR"),
                "skipped": count("SKIPPED"), "passed": count("PASSED"), "collection_errors": [], "skip_reasons": [],
                "not_passed": [f"{name}: {r}" for name, r in results if r in ("FAILED", "ERROR")],
                "stopped": "at the time limit: the tests after these did not run"}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts.update(not_passed=[], collection_errors=[], skip_reasons=set())
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}".strip(":")
        for tag in ("failure", "error"):
            problem = case.find(tag)
            if problem is None:
                continue
            if problem.get("message", "").startswith("collection failure"):
                missing = re.findall(r"No module named '([^']+)'", problem.text or "")
                counts["collection_errors"].append(f"{name}: {', '.join(missing) or 'import failed'}")
            else:
                counts["not_passed"].append(f"{name}: {problem.get('message', '')[:300]}")
        if case.find("skipped") is not None:
            counts["skip_reasons"].add(case.find("skipped").get("message", ""))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["skip_reasons"] = sorted(counts["skip_reasons"])
    return counts


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"# gpt-fast-serve GPU check{' (dry run: CPU, tiny shapes)' if r['dry_run'] else ''}", "",
             f"{r['started']}, {r.get('wall_s', 0)} s of a {r['budget_s']:.0f} s budget.", "",
             f"- GPU: {env.get('gpu', 'none')} x{env.get('gpus', 0)} (capability {env.get('capability', '-')}, "
             f"{env.get('sms', '-')} SMs, {env.get('gpu_memory_gib', '-')} GiB); nvidia-smi: "
             f"{env.get('nvidia_smi', 'not found')}",
             f"- torch {env.get('torch', env.get('torch_error'))}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"Python {env.get('python')}, {env.get('cpus')} CPUs, java: {env.get('java')}",
             "- packages: " + ", ".join(f"{k} {v}" if v else f"{k} MISSING" for k, v in env.get("packages", {}).items()),
             f"- gpt-fast-serve runtime requirements missing here: {', '.join(env.get('serve_missing', [])) or 'none'}"
             + (" (gguf: carry build/gpu_wheels, made by `bash scripts/gpu_check.sh --bundle`)"
                if "gguf" in env.get("serve_missing", []) else ""),
             "", "| step | status | wall s | CPU s |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('cpu_s', '')} |" for s in r["steps"]]
    p = r["pytest"]
    if p:
        lines += ["", f"pytest -m cuda: {p['passed']} passed, {p['failures']} failed, {p['errors']} errors, "
                      f"{p['skipped']} skipped"]
        lines += [f"- {x}" for x in p["not_passed"]]
        lines += [f"- not collected (missing here): {x}" for x in p["collection_errors"]]
        lines += [f"- stopped {p['stopped']}"] if "stopped" in p else []
        lines += [f"- skipped: {x}" for x in p["skip_reasons"]]
    if r["bench"]:
        limit = r.get("bandwidth_limit_gbs") or 0
        lines += ["", f"Batch-1 decode, {r.get('bench_model')}, random weights, bf16 activations; bandwidth limit "
                      f"{limit:.0f} GB/s (CUDA: a device copy, bytes read + written; CPU: a large sum)", "",
                  "| runner | weights | tok/s | GB/s | of limit | TTFT ms | compile s | H100 anchor tok/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["bench"]:
            anchor = ANCHORS.get("bf16" if row["weights"] == "unquantized" else row["weights"], "")
            lines.append(f"| {row['runner']} | {row['weights']} | {row['tokens_per_s']:.1f} | "
                         f"{row['bandwidth_gbs']:.0f} | {row['of_limit']:.0%} | {row['ttft_s'] * 1e3:.1f} | "
                         f"{row['compile_s']:.0f} | {anchor} |")
    if r["speculative"]:
        lines += ["", "Speculative decoding (batch 1, greedy)", "", "| decoding | tok/s | vs plain | mean accepted |",
                  "|---|---|---|---|"]
        lines += [f"| {row['name']} | {row['tokens_per_s']:.1f} | {row['vs_plain']:.2f}x | {row['mean_accepted']:.2f} |"
                  for row in r["speculative"]]
    return "\n".join(lines) + "\n"


STEPS = ("pytest", "bench", "speculative")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU (GPUs hidden), tiny shapes, eager: every step")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "build" / "gpu_check"))
    ap.add_argument("--budget", type=float, default=450, help="seconds for all steps together")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"which of {','.join(STEPS)} to run (a rerun's subset)")
    ap.add_argument("--quantize", default="none,int4,int8", help="bench.py's weights, in this order")
    a = ap.parse_args()
    steps = a.steps.split(",")
    if set(steps) - set(STEPS):
        ap.error(f"--steps takes {','.join(STEPS)}")
    if a.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal on a GPU machine stays on the CPU too
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # the benchmarks' JSON, merged into the report
    check = Check(a.out, a.dry_run, a.budget)
    py = sys.executable

    t0 = time.monotonic()
    check.report["environment"] = environment()
    check.report["steps"].append({"name": "environment", "status": "ok", "seconds": round(time.monotonic() - t0, 1)})
    check.say(json.dumps(check.report["environment"], indent=1))
    check.write()

    if "pytest" in steps:
        junit = a.out / "pytest.xml"
        junit.unlink(missing_ok=True)
        status, output = check.run("pytest -m cuda", [py, "-m", "pytest", "tests", "-m", "cuda", "-v", "-rs", "-p",
                                                      "no:cacheprovider", "--continue-on-collection-errors",
                                                      f"--junitxml={junit}"], cap=180)
        check.report["pytest"] = summary = pytest_summary(junit, output)
        if summary and not summary["not_passed"] and summary["collection_errors"]:
            # Test modules that import what this machine lacks: reported, not counted as failed CUDA tests.
            check.report["steps"][-1]["status"] = "ok (some modules not collected)"
        check.write()

    if a.dry_run:
        shape, device, compiled = "llama-tiny", "cpu", ["--compile", "eager", "--new-tokens", "8"]
        speculative = ["--eager", "--new-tokens", "8", "--rounds", "1"]
    else:
        shape, device, compiled = "llama-3.1-8b", "cuda", ["--compile", "compiled"]
        speculative = ["--rounds", "2", "--max-seq-len", "160"]
    check.report["bench_model"] = shape
    for quant in a.quantize.split(",") if "bench" in steps else []:
        path = work / f"bench-{quant}.json"
        status, _ = check.run(f"bench {shape} {quant}", [py, "scripts/bench.py", "--shape", shape, "--device", device,
                                                         "--dtype", "bfloat16", "--quantize", quant, "--groupsize",
                                                         "128", "--no-hf", "--warmup", "used", "--json", str(path),
                                                         *compiled], cap=100)
        if status == "ok":
            result = json.loads(path.read_text())
            check.report["bandwidth_limit_gbs"] = result["read_bandwidth_gbs"]
            check.report["bench"] += result["rows"]
            check.write()

    if "speculative" in steps:
        path = work / "speculative.json"
        status, _ = check.run("bench_speculative", [py, "scripts/bench_speculative.py", "--device", device, "--shape",
                                                    shape, "--warmup", "used", "--json", str(path), *speculative],
                              cap=240)
        if status == "ok":
            check.report["speculative"] = json.loads(path.read_text())["rows"]
    check.write()
    shutil.rmtree(work)
    check.say("\n" + markdown(check.report))
    failed = [s["name"] for s in check.report["steps"] if not s["status"].startswith("ok")]
    if failed:
        sys.exit(f"gpu_check: not clean: {', '.join(failed)} (see gpu_report.md)")
    check.say("gpu_check: all ok")


if __name__ == "__main__":
    main()
