"""Soak test against a running TorchServe: valid traffic, hostile input, then a killed worker.

    scripts/serve.sh start
    python scripts/soak.py [--minutes 10] [--port 8080] [--management-port 8081] [--model gpt-fast]
                           [--run-dir .] [--clients 12] [--json soak.json]

1. Reference: each valid request alone; its answer is what it must get under load too.
2. Warm-up: the hostile corpus once (so even a short run sends all of it), then a few seconds of traffic; the
   memory is measured: the worker's RSS, and the frontend's live heap (after a full GC, with the JDK's jcmd) and
   RSS.
3. Soak (--minutes): --clients threads send valid requests (streamed and not, greedy and seeded sampling, stop
   strings; one streamed request in 8 hangs up after its first chunk) while one thread sends the hostile corpus
   round after round: random bytes, deep nesting, bodies near TorchServe's 6.5 MB request limit and over it,
   wrong types for every field, lone surrogates, NaN/Infinity, huge numbers, stop-list abuse, prompts past the
   context. The memory is measured again.
4. Kill: the worker gets SIGKILL while the clients go on; once a new worker is ready, traffic runs on for a
   tenth of the soak (at least 5 s).

Prints a table and exits 1 on: a 5xx, a dropped connection or a 2xx for hostile input (or a 400 whose body does
not name the field), a valid request that failed or differed from its reference outside the kill window (from
the kill until the new worker is ready), a worker restart other than the one caused, or memory growth over 20%:
the worker's RSS, and the frontend's live heap (its RSS without jcmd: the JVM grows its heap lazily, so its RSS
rises by its initial heap size with no leak). Memory is read from /proc and jcmd: run it on the server's machine. The keys come from --run-dir's
key_file.json, the frontend's pid from its build/serve/.model_server.pid (where scripts/serve.sh puts them).
"""
import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpt_fast.serving.fields import is_type  # noqa: E402
from gpt_fast.serving.protocol import REQUEST_FIELDS  # noqa: E402

MAX_REQUEST_BYTES = 6_553_500  # TorchServe's max_request_size (config.properties leaves the default)
VALID = [
    {"prompt": "The capital of France", "max_new_tokens": 40},
    {"prompt": "Once upon a time there was a little", "max_new_tokens": 25, "stream": False},
    {"prompt": "A", "max_new_tokens": 1},
    {"prompt": "Bread and", "max_new_tokens": 30, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 7},
    {"prompt": "Bread and", "max_new_tokens": 30, "temperature": 1.0, "seed": 8, "stream": False},
    {"prompt": "The capital of France", "max_new_tokens": 40, "stop": ["ar", "zz"]},
    {"prompt": "The river ran past the old mill and the children watched the water", "max_new_tokens": 60},
    {"prompt": "Three ships sailed", "max_new_tokens": 16, "stop": "\n\n", "stream": False},
]
DISCONNECT_EVERY = 8  # one streamed request in this many hangs up after its first chunk


@dataclass
class Hostile:
    name: str
    data: bytes
    content_type: str = "application/json"
    expect: int = 400


@dataclass
class Result:
    kind: str  # valid | disconnect | hostile
    name: str
    status: str  # the HTTP status, "cut" (a stream broken after its 200) or "no reply"
    start: float
    end: float
    text: Optional[str] = None  # a valid request's answer
    problem: Optional[str] = None  # what was wrong with it


@dataclass
class Server:
    url: str
    management: str
    run_dir: Path
    keys: dict = field(default_factory=dict)

    def key(self, kind: str) -> str:
        if not self.keys:
            self.keys = json.loads((self.run_dir / "key_file.json").read_text())
        return self.keys[kind]["key"]

    def headers(self, content_type: str = "application/json") -> dict:
        return {"Authorization": f"Bearer {self.key('inference')}", "Content-Type": content_type}

    def workers(self) -> list[dict]:
        r = requests.get(self.management, headers={"Authorization": f"Bearer {self.key('management')}"}, timeout=10)
        r.raise_for_status()
        return r.json()[0]["workers"]

    def ready_pids(self) -> list[int]:
        try:
            return [w["pid"] for w in self.workers() if w["status"] == "READY"]
        except (requests.RequestException, KeyError, IndexError, ValueError):
            return []

    def frontend_pid(self) -> Optional[int]:
        path = self.run_dir / "build" / "serve" / ".model_server.pid"
        return int(path.read_text()) if path.exists() else None


def send(server: Server, kind: str, name: str, data: bytes, content_type: str = "application/json",
         hang_up: bool = False) -> Result:
    """POST and read the whole answer (or its first chunk, then hang up)."""
    start = time.time()
    try:
        with requests.post(server.url, data=data, headers=server.headers(content_type), stream=True,
                           timeout=(10, 300)) as r:
            status, chunks = str(r.status_code), []
            try:
                for chunk in r.iter_content(chunk_size=None):
                    chunks.append(chunk)
                    if hang_up:
                        break
            except requests.RequestException:
                status = "cut"
            body = b"".join(chunks)
    except requests.RequestException:
        return Result(kind, name, "no reply", start, time.time())
    result = Result(kind, name, status, start, time.time())
    if status == "200" and kind == "valid":
        streamed = json.loads(data).get("stream", True)
        try:
            result.text = body.decode() if streamed else json.loads(body)["text"]
        except (UnicodeDecodeError, ValueError, KeyError):
            result.problem = f"unreadable answer {body[:200]!r}"
    elif kind == "hostile" and status.isdigit() and int(status) < 500:
        result.text = body[:300].decode(errors="replace")
    elif kind == "valid":
        result.problem = body[:300].decode(errors="replace")
    return result


def hostile_corpus(context: int, rng: random.Random) -> list[Hostile]:
    """Bodies that must each get a 4xx (400 naming the field; 413 past the request size limit)."""
    def body(**fields) -> bytes:
        return json.dumps(fields).encode()

    near_limit = MAX_REQUEST_BYTES - 100
    corpus = [Hostile(f"random bytes ({n})", rng.randbytes(n)) for n in (1, 100, 10_000, 1_000_000)]
    corpus += [
        Hostile("empty body", b""),
        Hostile("null", b"null"),
        Hostile("a list", b'["The capital of France"]'),
        Hostile("no prompt", b"{}"),
        Hostile("byte order mark", b"\xef\xbb\xbf" + body(prompt="x")),
        Hostile("truncated JSON", body(prompt="The capital")[:-3]),
        Hostile("JSON sent as a form", body(prompt="x"), "application/x-www-form-urlencoded"),
        Hostile("form fields", b"prompt=hello&max_new_tokens=3", "application/x-www-form-urlencoded"),
        Hostile("nesting [ x1000", b"[" * 1000),
        Hostile("nesting [ x100000", b"[" * 100_000),
        Hostile("nesting {\"a\": x50000", b'{"a":' * 50_000),
        Hostile("nesting inside prompt", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        Hostile("nesting inside stop", b'{"prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        Hostile("nesting near the size limit", b"[" * near_limit),
        Hostile("prompt near the size limit", body(prompt="x" * near_limit)),
        Hostile("field name near the size limit", body(prompt="x", **{"y" * near_limit: 1})),
        Hostile("stop near the size limit", body(prompt="x", stop="s" * near_limit)),
        Hostile("list near the size limit", body(prompt="x", max_new_tokens=[1] * (near_limit // 3))),
        Hostile("body over the size limit", body(prompt="x" * (MAX_REQUEST_BYTES + 10)), expect=413),
        Hostile("lone surrogate in prompt", b'{"prompt": "\\ud800"}'),
        Hostile("lone surrogate in stop", b'{"prompt": "x", "stop": ["\\udfff"]}'),
        Hostile("surrogate as raw UTF-8", b'{"prompt": "\xed\xa0\x80"}'),
        Hostile("NaN temperature", b'{"prompt": "x", "temperature": NaN}'),
        Hostile("Infinity top_p", b'{"prompt": "x", "top_p": Infinity}'),
        Hostile("-Infinity temperature", b'{"prompt": "x", "temperature": -Infinity}'),
        Hostile("NaN max_new_tokens", b'{"prompt": "x", "max_new_tokens": NaN}'),
        Hostile("1e999 temperature", b'{"prompt": "x", "temperature": 1e999}'),
        Hostile("10**30 max_new_tokens", body(prompt="x", max_new_tokens=10**30)),
        Hostile("2**64 seed", body(prompt="x", seed=2**64)),
        Hostile("-1 seed", body(prompt="x", seed=-1)),
        Hostile("10**100 top_k", body(prompt="x", top_k=10**100)),
        Hostile("5000-digit seed", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"),
        Hostile("17 stop strings", body(prompt="x", stop=["s"] * 17)),
        Hostile("1 MB stop string", body(prompt="x", stop="s" * 2**20)),
        Hostile("16 stop strings of 300 KB", body(prompt="x", stop=["s" * 300_000] * 16)),
        Hostile("stop strings over 4 KB in all", body(prompt="x", stop=["é" * 1000] * 3)),
        Hostile("empty stop string", body(prompt="x", stop=["ok", ""])),
        Hostile("a million stop strings", body(prompt="x", stop=["s"] * 1_000_000)),
        Hostile("prompt past the context", body(prompt="hi " * (context + 8))),
        Hostile("prompt of 40 characters a token", body(prompt="x" * (40 * context))),
        Hostile("unknown field", body(prompt="x", temperatur=0.5)),
        Hostile("100000 unknown fields", body(prompt="x", **{f"f{i}": i for i in range(100_000)})),
        Hostile("duplicate key, last one wrong", b'{"prompt": "x", "prompt": 5}'),
    ]
    wrong = [None, True, 0, -1, 1.5, 2**70, "", "1", [], ["a"], [1], {}, {"a": 1}]
    for name, kind in REQUEST_FIELDS.items():
        for value in wrong:
            if not is_type(value, kind):
                fields = {"prompt": value} if name == "prompt" else {"prompt": "x", name: value}
                corpus.append(Hostile(f"{name}: {json.dumps(value)}", body(**fields)))
    return corpus


def check_hostile(result: Result, item: Hostile) -> Result:
    if result.status != str(item.expect):
        result.problem = f"expected {item.expect}, got {result.status}"
    elif item.expect == 400:
        try:
            error = json.loads(result.text)
            assert set(error) == {"error", "field"} and error["field"]
        except (ValueError, TypeError, AssertionError):
            result.problem = f"400 without a JSON error naming the field: {result.text!r}"
    return result


def context_length(server: Server) -> int:
    """The server's context length, from the 400 an over-long prompt gets."""
    r = requests.post(server.url, data=json.dumps({"prompt": "x" * 10**6}), headers=server.headers(), timeout=60)
    match = re.search(r"(\d+)-token context", r.text)
    return int(match.group(1)) if match else 2048


def log_bytes(run_dir: Path) -> int:
    """What the server's logs hold (rolled-over files included)."""
    return sum(p.stat().st_size for p in (run_dir / "logs").rglob("*") if p.is_file())


def memory(worker: int, frontend: Optional[int]) -> tuple:
    """MB: the worker's RSS, the frontend's live heap (None without jcmd) and RSS, both after a full GC."""
    live = None
    try:
        subprocess.run(["jcmd", str(frontend), "GC.run"], capture_output=True, timeout=120, check=True)
        heap = subprocess.run(["jcmd", str(frontend), "GC.heap_info"], capture_output=True, text=True, timeout=120,
                              check=True).stdout
        match = re.search(r"heap +total \d+K, used (\d+)K", heap)
        live = int(match.group(1)) / 1024 if match else None
    except (OSError, subprocess.SubprocessError):
        pass
    return rss_mb(worker), live, rss_mb(frontend)


def rss_mb(pid: Optional[int]) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return None


class Soak:
    def __init__(self, server: Server, clients: int, seed: int = 0):
        self.server, self.clients, self.rng = server, clients, random.Random(seed)
        self.results: list[Result] = []
        self.reference: dict[int, str] = {}
        self.pids_seen: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # ends a traffic phase
        self.done = threading.Event()  # ends the watch

    def record(self, result: Result) -> None:
        with self._lock:
            self.results.append(result)

    def valid(self, i: int, hang_up: bool = False) -> Result:
        kind = "disconnect" if hang_up else "valid"
        result = send(self.server, kind, f"valid {i}", json.dumps(VALID[i]).encode(), hang_up=hang_up)
        if kind == "valid" and result.status == "200" and not result.problem and i in self.reference \
                and result.text != self.reference[i]:
            result.problem = f"differs from its reference: {result.text!r} vs {self.reference[i]!r}"
        return result

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            i = rng.randrange(len(VALID))
            hang_up = VALID[i].get("stream", True) and rng.randrange(DISCONNECT_EVERY) == 0
            self.record(self.valid(i, hang_up))

    def hostile(self, corpus: list[Hostile], rounds: Optional[int] = None) -> None:
        done = 0
        while not self._stop.is_set() and (rounds is None or done < rounds):
            for item in self.rng.sample(corpus, len(corpus)):
                if self._stop.is_set() and rounds is None:
                    return
                self.record(check_hostile(send(self.server, "hostile", item.name, item.data, item.content_type),
                                          item))
            done += 1

    def watch(self) -> None:
        """Note every worker that is ready, by pid: a new pid is a restart."""
        while not self.done.wait(0.5):
            self.note_pids(self.server.ready_pids())

    def note_pids(self, pids: list[int]) -> None:
        with self._lock:
            self.pids_seen += [pid for pid in pids if pid not in self.pids_seen]

    def traffic(self, seconds: float, corpus: Optional[list[Hostile]] = None,
                during: Optional[callable] = None) -> None:
        """Clients (and the hostile thread) for `seconds`, running `during()` meanwhile if given."""
        self._stop.clear()
        threads = [threading.Thread(target=self.client, args=(self.rng.randrange(2**32),), daemon=True)
                   for _ in range(self.clients)]
        if corpus:
            threads.append(threading.Thread(target=self.hostile, args=(corpus,), daemon=True))
        for t in threads:
            t.start()
        end = time.time() + seconds
        if during:
            end = during() + seconds
        while time.time() < end:
            time.sleep(0.2)
        self._stop.set()
        for t in threads:
            t.join(timeout=330)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else \
        (values[0] if values else float("nan"))


@dataclass
class Measured:
    """What the phases measured, for the report."""
    phases: dict[str, float] = field(default_factory=dict)  # seconds each took
    corpus_size: int = 0
    memory_before: tuple = (None, None, None)  # MB: worker RSS, frontend live heap, frontend RSS
    memory_after: tuple = (None, None, None)
    log_bytes_per_request: float = 0.0
    restarts_before_kill: int = 0
    kill_at: float = 0.0
    ready_at: float = 0.0  # a new worker was ready


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8080, help="inference port")
    ap.add_argument("--management-port", type=int, default=8081)
    ap.add_argument("--model", default="gpt-fast")
    ap.add_argument("--run-dir", type=Path, default=ROOT, help="where key_file.json, logs/ and build/serve/ are")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--json", type=Path, help="write the report and every failure here")
    args = ap.parse_args()

    server = Server(f"http://127.0.0.1:{args.port}/predictions/{args.model}",
                    f"http://127.0.0.1:{args.management_port}/models/{args.model}", args.run_dir)
    soak, measured = Soak(server, args.clients), Measured()
    soak.note_pids(server.ready_pids())
    if not soak.pids_seen:
        print(f"error: no READY worker for {args.model} on port {args.management_port}", file=sys.stderr)
        return 1
    watcher = threading.Thread(target=soak.watch, daemon=True)
    watcher.start()
    clock = time.time()

    def phase(name: str) -> None:
        nonlocal clock
        measured.phases[name], clock = time.time() - clock, time.time()

    for i in range(len(VALID)):  # 1. the reference answers, each request alone
        result = soak.valid(i)
        if result.status != "200" or result.problem:
            print(f"error: {VALID[i]} alone got {result.status} {result.problem or ''}", file=sys.stderr)
            return 1
        soak.reference[i] = result.text
    corpus = hostile_corpus(context_length(server), soak.rng)
    measured.corpus_size = len(corpus)
    phase("reference")
    soak.hostile(corpus, rounds=1)  # 2. warm-up
    soak.traffic(3)
    worker, frontend = soak.pids_seen[0], server.frontend_pid()
    measured.memory_before = memory(worker, frontend)
    phase("warm-up")

    logs, sent = log_bytes(args.run_dir), len(soak.results)
    soak.traffic(args.minutes * 60, corpus)  # 3. soak
    measured.memory_after = memory(worker, frontend)
    measured.log_bytes_per_request = (log_bytes(args.run_dir) - logs) / max(1, len(soak.results) - sent)
    measured.restarts_before_kill = len(soak.pids_seen) - 1
    phase("soak")

    def kill() -> float:  # 4. kill -9 the worker; returns when a new one is ready
        victim = (server.ready_pids() or [worker])[0]
        measured.kill_at = time.time()
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 600
        while time.time() < deadline:
            pids = server.ready_pids()
            if pids and victim not in pids:
                soak.note_pids(pids)
                break
            time.sleep(0.2)
        measured.ready_at = time.time()
        return measured.ready_at

    soak.traffic(max(5.0, args.minutes * 6), during=kill)
    phase("kill and after")
    soak.done.set()
    watcher.join(timeout=15)
    return report(soak, measured, args)


def report(soak: Soak, m: Measured, args: argparse.Namespace) -> int:
    """Print the table and the findings; 1 if any of them fails the soak."""
    in_window = lambda r: r.start <= m.ready_at and r.end >= m.kill_at  # noqa: E731
    statuses = sorted({r.status for r in soak.results}, key=lambda s: (not s.isdigit(), s))
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in m.phases.items())
    lines = [f"soak: {args.minutes:g} min + kill against {soak.server.url}, {args.clients} clients ({phases}); "
             f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
             "", f"| requests | {' | '.join(statuses)} | total |", "|---" * (len(statuses) + 2) + "|"]
    for kind in ("valid", "disconnect", "hostile"):
        mine = [r for r in soak.results if r.kind == kind]
        counts = [sum(r.status == s for r in mine) for s in statuses]
        lines.append(f"| {kind} | {' | '.join(map(str, counts))} | {len(mine)} |")
    valid = [r for r in soak.results if r.kind == "valid"]
    lost = [r for r in valid if (r.status != "200" or r.problem) and not in_window(r)]
    differed = [r for r in valid if r.problem and r.problem.startswith("differs")]
    hostile_bad = [r for r in soak.results if r.kind == "hostile" and r.problem]
    server_errors = [r for r in soak.results if r.status.startswith("5")]
    latencies = [r.end - r.start for r in valid if r.status == "200" and not in_window(r)]
    restarts = len(soak.pids_seen) - 1
    growth = [(after - before) / before if before and after else None
              for before, after in zip(m.memory_before, m.memory_after)]
    mem = ["n/a" if g is None else f"{b:.0f} -> {a:.0f} MB ({g:+.1%})"
           for b, a, g in zip(m.memory_before, m.memory_after, growth)]
    gated = [growth[0], growth[1] if growth[1] is not None else growth[2]]  # the frontend's RSS only without jcmd
    lines += ["",
              f"- hostile corpus: {m.corpus_size} bodies; answered other than expected: {len(hostile_bad)}",
              f"- valid answers that differed from the same request alone: {len(differed)}",
              f"- 5xx: {len(server_errors)} (for hostile input: {sum(r.kind == 'hostile' for r in server_errors)})",
              f"- valid requests lost outside the kill window: {len(lost)} "
              f"(in the window: {sum(in_window(r) and r.status != '200' for r in valid)} of "
              f"{sum(in_window(r) for r in valid)})",
              f"- latency of complete valid requests: p50 {percentile(latencies, 50):.2f} s, "
              f"p99 {percentile(latencies, 99):.2f} s",
              f"- worker restarts: {restarts} (before the kill: {m.restarts_before_kill}); "
              f"a new worker ready {m.ready_at - m.kill_at:.1f} s after the kill",
              f"- memory: worker RSS {mem[0]}; frontend live heap {mem[1]}, RSS {mem[2]} (after a full GC)",
              f"- logs written during the soak: {m.log_bytes_per_request * 1000 / 1e6:.3f} MB per 1,000 requests"]
    failures = [(bool(hostile_bad), "hostile input answered other than with its 4xx"),
                (bool(lost), "valid requests lost or wrong outside the kill window"),
                (restarts != 1 or m.restarts_before_kill, "worker restarts other than the kill"),
                (any(g is not None and g > 0.2 for g in gated), "memory grew over 20%")]
    failed = [why for bad, why in failures if bad]
    lines.append(f"- result: {'FAIL: ' + '; '.join(failed) if failed else 'PASS'}")
    for r in (hostile_bad + lost)[:20]:
        lines.append(f"  {r.kind} {r.name!r}: {r.status} {r.problem or ''}"[:300])
    killed = {f"{r.status} {r.problem or ''}"[:200] for r in valid if in_window(r) and r.status != "200"}
    lines += [f"  in the kill window: {answer}" for answer in sorted(killed)]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"report": lines, "failures": [asdict(r) for r in hostile_bad + lost]},
                                        indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
