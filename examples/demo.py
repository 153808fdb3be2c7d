"""`make demo`: Outpost serving a model end to end, then stopping cleanly.

1. trains a small scikit-learn pipeline and packages it (int8 ONNX + manifest), as
   `outpost package` does;
2. installs the package into a fresh agent and starts `outpost-agent run` on a Unix
   socket in a temporary directory;
3. asks for predictions over the socket in the Open Inference Protocol v2, with JSON
   and with binary tensors, and checks them against onnxruntime run directly; then one
   client asks 2000 times in a row and the latency it saw is printed;
4. installs a second version while the agent serves, switches to it, and rolls back
   to version 1 by hand;
5. stops the agent with SIGTERM (the way systemd does) and checks it exited 0 and
   removed its socket;
6. starts a hub, pushes the versions (validated, signed), deploys with a canary, and checks
   with an independent TUF client what a device of that group will see;
7. starts a device agent connected to the hub: it pulls, verifies, probes and commits
   version 1, then is assigned a deliberately slow version 3, which fails probation on
   latency; the agent falls back to version 1 by itself, with no failed request; the device
   reports over MQTT (a local Mosquitto) and the hub's fleet view shows what happened;
8. two more devices serve version 1 to their apps, one on data like the training data, one
   where a sensor reads the alcohol content 1 sigma high; apps feed some true labels back.
   Each device publishes per-window summaries and drift tests; the hub adds the devices'
   counts into a fleet summary (with accuracy from the labels) and raises a drift alert for
   the shifted device only, after three windows in a row;
9. two devices connected to the hub run version 1; a canary rollout of version 2 (50%, then
   100%, each step gated on the candidate's error rate and latency against the stable one, on
   fall-backs and on drift) advances by itself and ends with both devices on version 2, with no
   failed request; the dashboard's address is printed;
10. data capture for retraining: the group's deployment asks its devices to keep half of their
   requests; one device answers its apps (over the socket, and over MQTT for an app that speaks
   MQTT v5 request/response), the apps feed the true labels back, and the hub exports what was
   captured as CSV, every captured request once, each with its prediction and label;
11. the hub scaled out: a second `outpost-hub serve` on the same database and signing directory
   (what runs behind a load balancer; PostgreSQL and an object store for several hosts). A
   deployment made through the second is verified by a device polling the first, and the
   device's telemetry, shared between the two consumers, is stored once and seen from both.

Exits non-zero if any step does not behave as described.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


DEMO_PROBATION = {"min_requests": 30, "min_seconds": 2.0, "max_error_rate": 0.02, "max_latency_ratio": 2.0}


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str) -> str:
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    print(result.stdout.rstrip())
    if result.returncode != 0:
        print(result.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"demo: {args[0]} failed with exit code {result.returncode}")
    return result.stdout


def call(
    sock: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    from agent.client import UnixHTTPConnection

    conn = UnixHTTPConnection(sock, 30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def read_sample(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], np.array(rows[1:], dtype=np.float64)
    return header[:-1], data[:, :-1].astype(np.float32), data[:, -1].astype(np.int64)


def build_packages(out: Path) -> tuple[Path, Path, Path]:
    from examples.train_example import build_example, train_and_save
    from hub.packager import PackageOptions, build_package

    step("1. Train a scikit-learn pipeline and package it as int8 ONNX (outpost package)")
    v1 = build_example(out)
    model_path, sample_path = train_and_save(out)
    manifest = json.loads((v1 / "manifest.json").read_text())
    q = manifest["quantization"]
    print(
        f"package {v1.name}: kept {q['kept']}, accuracy fp32 {q['accuracy_fp32']:.3f} / "
        f"int8 {q['accuracy_int8']:.3f}, inputs {manifest['inputs']}"
    )
    # Version 2: the same data packaged again (a retrained model would go the same way).
    v2 = build_package(
        model_path,
        sample_path,
        PackageOptions(name="wine", version=2, out_dir=out, target="class", replace=True),
    ).directory
    print(f"package {v2.name} built")
    # A short probation, so the demo does not wait for the default 50 answers and 30 s.
    from agent.package.store import write_package_tar

    for package in (v1, v2):
        doc = json.loads((package / "manifest.json").read_text())
        doc["probation"] = DEMO_PROBATION
        (package / "manifest.json").write_text(json.dumps(doc))
        package.with_suffix(".tar").unlink(missing_ok=True)
        write_package_tar(package, package.with_suffix(".tar"))
    return v1, v2, sample_path


def start_agent(work: Path, config: Path, sock: str, package: Path) -> subprocess.Popen[bytes]:
    step("2. Install the package and start the agent on a Unix socket")
    run(str(BIN / "outpost-agent"), "install", str(package.with_suffix(".tar")), "--config", str(config))
    log = (work / "agent.log").open("wb")
    started = time.monotonic()
    agent = subprocess.Popen(
        [str(BIN / "outpost-agent"), "run", "--config", str(config)], stdout=log, stderr=log
    )
    while call_ready(sock) != 200:
        if agent.poll() is not None or time.monotonic() - started > 60:
            print((work / "agent.log").read_text(), file=sys.stderr)
            raise SystemExit("demo: the agent did not become ready")
        time.sleep(0.05)
    mode = oct(Path(sock).stat().st_mode & 0o777)
    print(f"agent ready in {time.monotonic() - started:.2f} s, socket {sock} mode {mode}")
    return agent


def predict(sock: str, package: Path, sample_path: Path) -> bytes:
    step("3. Predictions over the socket (Open Inference Protocol v2)")
    _, x, y = read_sample(sample_path)
    labels = json.loads((package / "manifest.json").read_text())["labels"]
    rows = x[:5]
    body = json.dumps(
        {
            "id": "demo-1",
            "inputs": [
                {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
            ],
        }
    ).encode()
    print(f"$ curl --unix-socket {sock} -X POST http://localhost/v2/models/wine/infer -d '{{...5 rows}}'")
    status, _, raw = call(sock, "POST", "/v2/models/wine/infer", body)
    answer = json.loads(raw)
    assert status == 200, raw
    outs = {o["name"]: o for o in answer["outputs"]}
    predicted = outs["label"]["data"]
    probs = np.array(outs["probabilities"]["data"]).reshape(outs["probabilities"]["shape"])
    for i, label in enumerate(predicted):
        print(f"  row {i}: predicted {labels[label]!r} (p={probs[i].max():.3f}), true {labels[y[i]]!r}")
    print(
        f"  answered by model {answer['model_name']} version {answer['model_version']}, "
        f"prediction id {answer['id']}"
    )

    import onnxruntime as ort

    direct = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    want_label, want_probs = direct.run(["label", "probabilities"], {"input": rows})
    assert predicted == want_label.tolist()
    assert np.allclose(probs, want_probs, atol=1e-6)
    print("  identical to onnxruntime run directly on the package: yes")

    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, raw = call(
        sock,
        "POST",
        "/v2/models/wine/infer",
        header + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200, raw
    hlen = int(headers["inference-header-content-length"])
    accuracy = float(np.mean(np.frombuffer(raw[hlen:], dtype="<i8") == y))
    print(f"  binary tensors: {len(x)} rows in one request, accuracy on the held-out sample {accuracy:.3f}")

    one_client_latency(sock, x[:1])

    status, _, raw = call(sock, "POST", "/v2/models/wine/infer", b'{"inputs": [{"name": "input"}]}')
    print(f"  a malformed request gets {status}: {json.loads(raw)['error']}")
    assert status == 400
    return body


def one_client_latency(sock: str, row: np.ndarray, count: int = 2000) -> None:
    """An app asking again as soon as it has its answer, one row at a time on one connection."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, row.shape[1]], "datatype": "FP32",
                                   "data": row.ravel().tolist()}]}).encode()  # fmt: skip
    request = b"POST /v2/models/wine/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    times = []
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        for _ in range(count):
            started = time.perf_counter_ns()
            s.sendall(request)
            answer = b""
            while True:
                answer += s.recv(65536)
                head, sep, rest = answer.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head, re.I)
                if sep and length is not None and len(rest) >= int(length.group(1)):
                    break
            times.append(time.perf_counter_ns() - started)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    p50, p99 = np.percentile(times, [50, 99]) / 1000
    print(f"  one client asking again at once, {count} one-row requests: p50 {p50:.0f} µs, p99 {p99:.0f} µs")
    text = call(sock, "GET", "/metrics")[2].decode()
    window = re.search(r"^outpost_busy_poll_window_seconds (\S+)$", text, re.M)
    if window is not None:
        print(
            f"  (between requests the agent polled for the next one instead of sleeping: "
            f"server.busy_poll_us, window now {float(window.group(1)) * 1e6:.0f} µs)"
        )
    compiled = json.loads(call(sock, "GET", "/v1/status")[2])["compiled"]
    if compiled:
        print(f"  (its request path runs compiled: {len(compiled)} modules built with mypyc at install)")
    else:
        print("  (its request path runs as plain Python: no C compiler at install; slower, same answers)")


def switch_and_roll_back(sock: str, config: Path, v2: Path, body: bytes) -> None:
    step("4. A new version while serving, then a rollback by hand")
    agent_cli = str(BIN / "outpost-agent")
    run(agent_cli, "install", str(v2), "--config", str(config))
    _, _, raw = call(sock, "POST", "/v2/models/wine/infer", body)
    print(f"  now answered by version {json.loads(raw)['model_version']}")
    assert json.loads(raw)["model_version"] == "2"
    run(agent_cli, "default", "wine", "1", "--config", str(config))
    _, _, raw = call(sock, "POST", "/v2/models/wine/infer", body)
    print(f"  after the rollback, answered by version {json.loads(raw)['model_version']}")
    assert json.loads(raw)["model_version"] == "1"
    run(agent_cli, "status", "--config", str(config))
    metrics = call(sock, "GET", "/metrics")[2].decode().splitlines()
    print("  " + "\n  ".join(m for m in metrics if m.startswith("outpost_inference_requests_total")))


def stop_agent(agent: subprocess.Popen[bytes], sock: str) -> None:
    step("5. Stop the agent with SIGTERM, as systemd does")
    agent.send_signal(signal.SIGTERM)
    code = agent.wait(30)
    gone = not Path(sock).exists()
    print(f"agent exited with code {code}; socket removed: {gone}")
    assert code == 0 and gone


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A Mosquitto for the demo's telemetry, on a free loopback port (make demo installs it)."""
    import os
    import pwd

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = work / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    if os.geteuid() == 0:  # as root Mosquitto would switch to a user that cannot read the temp dir
        lines.append(f"user {pwd.getpwuid(0).pw_name}")
    conf.write_text("\n".join(lines) + "\n")
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        if broker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("demo: mosquitto did not start (make sysdeps installs it)")
        time.sleep(0.05)
    return broker, f"mqtt://127.0.0.1:{port}"


def hub_publish(work: Path, v1: Path, v2: Path, mqtt_url: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    step("6. The hub: sign and publish the versions, assign one to a device group")
    data = work / "hub"
    run(str(BIN / "outpost-hub"), "init", "--data", str(data))
    # The rollout controller looks every second (default 10 s), so step 9 is short.
    settings = data / "hub.toml"
    lines = [
        ln for ln in settings.read_text().splitlines() if not ln.strip().startswith("rollout_interval_s")
    ]
    settings.write_text("\n".join([*lines, "rollout_interval_s = 1.0"]) + "\n")
    hub, url = start_hub(work, data, mqtt_url, "hub")
    import os

    os.environ["OUTPOST_HUB"] = url
    os.environ["OUTPOST_TOKEN"] = (data / "operator.token").read_text().strip()
    run(str(BIN / "outpost"), "push", str(v1.with_suffix(".tar")), "--quiet")
    run(str(BIN / "outpost"), "push", str(v2), "--quiet")
    run(str(BIN / "outpost"), "deploy", "wine", "1", "--group", "demo", "--canary", "2", "--percent", "10")
    run(str(BIN / "outpost"), "models")

    # What a device will see: an independent TUF client that trusts only the root from init.
    from tuf.ngclient import Updater

    cache = work / "device-tuf"
    (cache / "metadata").mkdir(parents=True)
    updater = Updater(
        metadata_dir=str(cache / "metadata"),
        metadata_base_url=f"{url}/tuf/metadata/",
        target_dir=str(cache),
        target_base_url=f"{url}/tuf/targets/",
        bootstrap=(data / "tuf" / "metadata" / "root.json").read_bytes(),
    )
    updater.refresh()
    info = updater.get_targetinfo("groups/demo/assignment.json")
    assert info is not None
    assignment = json.loads(Path(updater.download_target(info)).read_bytes())
    model = updater.get_targetinfo(assignment["stable"]["model"])
    assert model is not None
    print(
        f"  a device of group demo verifies its signed assignment: {assignment['model']} stable "
        f"v{assignment['stable']['version']}, canary v{assignment['candidate']['version']} for "
        f"{assignment['percent']}% of devices; model {model.path} sha256 {model.hashes['sha256'][:12]}…"
    )
    return hub, url, data


class Traffic:
    """A local app asking for predictions all along; counts the answers that were not 200."""

    def __init__(self, sock: str, body: bytes, more: list[bytes] | None = None) -> None:
        import threading

        self.sock, self.body = sock, body
        self.bodies = [body, *(more or [])]  # sent in turn
        self.answers = 0
        self.failures = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            body = self.bodies[turn % len(self.bodies)]
            turn += 1
            try:
                status = call(self.sock, "POST", "/v2/models/wine/infer", body)[0]
            except OSError:
                status = 0
            self.answers += 1
            self.failures += status != 200
            time.sleep(0.002)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def device_updates(work: Path, url: str, hub_data: Path, v1: Path, body: bytes, mqtt_url: str) -> None:
    step("7. A device pulls its assignment, tries a new version, and falls back by itself")
    from examples.broken_versions import make_slow_variant

    sock = str(work / "device.sock")
    config = work / "device.toml"
    config.write_text(
        f'device_id = "demo-002"\ngroup = "field"\ndata_dir = "{work / "device"}"\n'
        f'[server]\nsocket = "{sock}"\n'
        f'[hub]\nurl = "{url}"\ntrusted_root = "{hub_data / "tuf" / "metadata" / "root.json"}"\n'
        "poll_interval_s = 0.5\n"
        f'[mqtt]\nurl = "{mqtt_url}"\n'
    )
    run(str(BIN / "outpost"), "deploy", "wine", "1", "--group", "field")
    log = (work / "device.log").open("wb")
    device = subprocess.Popen(
        [str(BIN / "outpost-agent"), "run", "--config", str(config)], stdout=log, stderr=log
    )
    traffic = Traffic(sock, body)
    try:
        wait_until("the device to serve", lambda: call_ready(sock) == 200)
        traffic.thread.start()

        def update() -> dict[str, Any]:
            doc: dict[str, Any] = json.loads(call(sock, "GET", "/v1/status")[2])["update"]
            return doc

        wait_until("v1 committed", lambda: update()["state"] == "committed")
        print(f"  device demo-002 verified, probed and committed {update()['current']}")
        slow = make_slow_variant(v1, work / "packages", 3)
        print("  version 3: the same answers, many times slower per request (a deliberately broken build)")
        run(str(BIN / "outpost"), "push", str(slow), "--quiet")
        run(str(BIN / "outpost"), "deploy", "wine", "3", "--group", "field")
        wait_until("the fall back", lambda: update()["state"] == "rolled_back")
        st = update()
        for event in st["events"]:
            reason = f": {event['reason']}" if event.get("reason") else ""
            print(f"  {event['from']:>11} -> {event['to']:<11} on {event['event']}{reason}")
        print(f"  now serving {st['current']}; version 3 is marked bad and not retried")
        assert "v1" in st["current"]
        print("  what the hub's fleet view says (telemetry over MQTT):")
        wait_until(
            "the fleet view",
            lambda: "rolled_back" in run_quiet(str(BIN / "outpost"), "fleet"),
        )
        run(str(BIN / "outpost"), "fleet")
    finally:
        traffic.stop.set()
        if traffic.thread.is_alive():
            traffic.thread.join(10)
        device.send_signal(signal.SIGTERM)
        device.wait(30)
    print(f"  {traffic.answers} predictions during the update and the fall back, {traffic.failures} failed")
    assert traffic.failures == 0


def monitoring(work: Path, mqtt_url: str, v1: Path, sample_path: Path) -> None:
    step("8. Monitoring: per-window summaries and drift from two devices, summed at the hub")
    features, x, y = read_sample(sample_path)
    alcohol = features.index("alcohol")
    rng = np.random.default_rng(8)
    devices: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for name in ("demo-003", "demo-004"):
            sock = str(work / f"{name}.sock")
            config = work / f"{name}.toml"
            config.write_text(
                f'device_id = "{name}"\ngroup = "plant"\ndata_dir = "{work / name}"\n'
                f'[server]\nsocket = "{sock}"\n[mqtt]\nurl = "{mqtt_url}"\n'
                # Small windows so the demo is short: 8 requests of 50 rows each.
                "[monitor]\nwindow_requests = 8\ndrift_min_rows = 200\ndrift_k = 3\n"
            )
            run_quiet(
                str(BIN / "outpost-agent"), "install", str(v1.with_suffix(".tar")), "--config", str(config)
            )
            log = (work / f"{name}.log").open("wb")
            proc = subprocess.Popen(
                [str(BIN / "outpost-agent"), "run", "--config", str(config)], stdout=log, stderr=log
            )
            devices[name] = (proc, sock)
        for name, (_, sock) in devices.items():
            wait_until(f"{name} to serve", lambda sock=sock: call_ready(sock) == 200)
        print("  demo-003: inputs like the training data; demo-004: alcohol read 1 sigma too high")
        labelled = 0
        for _window in range(4):
            for name, (_, sock) in devices.items():
                for _ in range(8):
                    pick = rng.integers(0, len(x), size=50)
                    rows = x[pick].copy()
                    if name == "demo-004":
                        rows[:, alcohol] += x[:, alcohol].std()
                    body = json.dumps(
                        {
                            "inputs": [
                                {
                                    "name": "input",
                                    "shape": list(rows.shape),
                                    "datatype": "FP32",
                                    "data": rows.ravel().tolist(),
                                }
                            ]
                        }
                    ).encode()
                    status, _, data = call(sock, "POST", "/v2/models/wine/infer", body)
                    assert status == 200, data
                    if labelled < 40:  # the apps know the true class of some predictions later
                        answer = json.loads(data)
                        label = {"id": answer["id"], "label": [int(v) for v in y[pick]]}
                        status, _, data = call(sock, "POST", "/v1/feedback", json.dumps(label).encode())
                        assert status == 200, data
                        labelled += 1
        print("  each device sent 4 windows of 400 rows; 40 requests (2000 rows) were labelled afterwards")
        outpost = str(BIN / "outpost")
        wait_until(
            "the windows at the hub",
            lambda: (
                "2 devices, 8 windows" in run_quiet(outpost, "fleet", "summary", "wine:1", "--group", "plant")
            ),
        )
        run(outpost, "fleet", "summary", "wine:1", "--group", "plant")
        run(outpost, "fleet", "drift", "wine:1", "--group", "plant")
        wait_until(
            "the drift alert", lambda: "demo-004" in run_quiet(outpost, "fleet", "alerts", "--kind", "drift")
        )
        alerts = run(outpost, "fleet", "alerts", "--kind", "drift")
        assert "demo-004" in alerts and "demo-003" not in alerts, "demo: the alert should name demo-004 only"
        status, _, data = call(devices["demo-004"][1], "GET", "/v1/status")
        seen = json.loads(data)["monitor"]["versions"][0]
        print(f"  demo-004 itself says: drift alert {seen['drift_alert']}, features {seen.get('alerting')}")
    finally:
        for proc, _ in devices.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


def start_hub_device(
    work: Path, name: str, group: str, url: str, hub_data: Path, mqtt_url: str, extra: str = ""
) -> tuple[subprocess.Popen[bytes], str]:
    """An agent that follows the hub's assignment for `group` and reports over MQTT each second."""
    sock = str(work / f"{name}.sock")
    config = work / f"{name}.toml"
    config.write_text(
        f'device_id = "{name}"\ngroup = "{group}"\ndata_dir = "{work / name}"\n'
        f'[server]\nsocket = "{sock}"\n'
        f'[hub]\nurl = "{url}"\ntrusted_root = "{hub_data / "tuf" / "metadata" / "root.json"}"\n'
        "poll_interval_s = 0.5\n"
        f'[mqtt]\nurl = "{mqtt_url}"\n[monitor]\nwindow_s = 1.0\n{extra}'
    )
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "outpost-agent"), "run", "--config", str(config)], stdout=log, stderr=log
    )
    return proc, sock


def sample_requests(sample_path: Path, seed: int, n: int = 200) -> list[bytes]:
    """Single-row inference requests drawn from the held-out sample: traffic like the training data."""
    _, x, _ = read_sample(sample_path)
    picks = np.random.default_rng(seed).integers(0, len(x), size=n)
    return [
        json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 13], "datatype": "FP32", "data": x[i].tolist()}]}
        ).encode()
        for i in picks
    ]


def rollout(work: Path, url: str, hub_data: Path, mqtt_url: str, sample_path: Path) -> None:
    step("9. A canary rollout that advances by itself on the devices' telemetry")
    # The apps' requests: rows like the training data (one fixed row would be drift, and the
    # rollout's drift gate would rightly halt it).
    bodies = sample_requests(sample_path, seed=9)
    from agent.update.canary import bucket

    # A salt that puts one of the two devices in the first 50%: the rollout keeps it while ramping.
    names = ("demo-005", "demo-006")
    salt = next(
        f"demo-{i}"
        for i in range(1000)
        if sorted(bucket(f"demo-{i}", n) < 50 for n in names) == [False, True]
    )
    import requests

    token = os.environ["OUTPOST_TOKEN"]
    resp = requests.put(
        f"{url}/api/v1/groups/line/deployment",
        json={"model": "wine", "stable": 1, "candidate": 2, "percent": 0, "salt": salt},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    resp.raise_for_status()
    devices: list[tuple[subprocess.Popen[bytes], str, Traffic]] = []
    try:
        for name in names:
            proc, sock = start_hub_device(work, name, "line", url, hub_data, mqtt_url)
            devices.append((proc, sock, Traffic(sock, bodies[0], bodies[1:])))
        for _proc, sock, traffic in devices:
            wait_until("the device to serve", lambda sock=sock: call_ready(sock) == 200)
            traffic.thread.start()

        def state(sock: str) -> dict[str, Any]:
            doc: dict[str, Any] = json.loads(call(sock, "GET", "/v1/status")[2])["update"]
            return doc

        for _, sock, _ in devices:
            wait_until("v1 committed", lambda sock=sock: state(sock)["state"] == "committed")
        print("  demo-005 and demo-006 committed version 1; now the rollout of version 2:")
        out = run(
            str(BIN / "outpost"), "rollout", "start", "wine", "2", "--group", "line", "--steps", "50,100",
            "--min-time", "3s", "--min-requests", "30", "--max-latency-ratio", "20",
        )  # fmt: skip
        found = re.search(r"rollout (\d+):", out)
        assert found is not None, out
        rollout_id = found.group(1)
        outpost = str(BIN / "outpost")
        try:
            wait_until(
                "the rollout to complete",
                lambda: "completed" in run_quiet(outpost, "rollout", "status", rollout_id),
                timeout=180,
            )
        except SystemExit:
            print(run_quiet(outpost, "rollout", "status", rollout_id))
            for _, sock, _ in devices:
                print(json.dumps(state(sock), indent=1)[:1500])
            print(run_quiet(outpost, "fleet"))
            raise
        run(outpost, "rollout", "status", rollout_id)
        for _, sock, _ in devices:
            wait_until("the device on v2", lambda sock=sock: "v2 " in (state(sock)["current"] or ""))
        failures = sum(t.failures for _, _, t in devices)
        answers = sum(t.answers for _, _, t in devices)
        print(f"  both devices run version 2; {answers} predictions during the rollout, {failures} failed")
        assert failures == 0
    finally:
        for proc, _, traffic in devices:
            traffic.stop.set()
            if traffic.thread.is_alive():
                traffic.thread.join(10)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    print(f"\n  dashboard: {url}/  (log in with the operator token in {hub_data / 'operator.token'})")
    print("  (it stops with the demo: `make demo-fleet` runs the same and keeps the fleet up to explore)")


def capture(work: Path, url: str, hub_data: Path, mqtt_url: str, sample_path: Path) -> None:
    step("10. Data capture for retraining: sampled requests, predictions and labels, exported by the hub")
    outpost = str(BIN / "outpost")
    run(outpost, "capture", "start", "--group", "line", "--sample", "50%", "--max-rows-per-min", "600")
    # demo-005 holds version 2, committed in step 9. Its apps speak the socket, and one speaks MQTT.
    proc, sock = start_hub_device(
        work, "demo-005", "line", url, hub_data, mqtt_url,
        extra=f'[capture]\nflush_s = 1.0\n[mqtt_inference]\nenabled = true\nurl = "{mqtt_url}"\n',
    )  # fmt: skip
    try:
        wait_until("demo-005 to serve", lambda: call_ready(sock) == 200)

        def captured() -> dict[str, Any]:
            doc: dict[str, Any] = json.loads(call(sock, "GET", "/v1/status")[2])["capture"]
            return doc["models"].get("wine", {})

        wait_until("the device to capture", lambda: captured().get("sample_bp") == 5000)
        _, x, y = read_sample(sample_path)
        picks = np.random.default_rng(11).integers(0, len(x), size=200)
        for i in picks:
            row = {"name": "input", "shape": [1, 13], "datatype": "FP32", "data": x[i].tolist()}
            status, _, data = call(
                sock, "POST", "/v2/models/wine/infer", json.dumps({"inputs": [row]}).encode()
            )
            assert status == 200, data
            label = json.dumps({"id": json.loads(data)["id"], "label": int(y[i])}).encode()
            status, _, data = call(sock, "POST", "/v1/feedback", label)  # the app learns the truth
            assert status == 200, data
        mqtt_answer = ask_over_mqtt(mqtt_url, x[picks[0]])
        print(f"  an app asked over MQTT (v5 request/response): version {mqtt_answer['model_version']} "
              f"answered {mqtt_answer['outputs'][0]['data']}")  # fmt: skip
        wait_until(
            "the batches sent", lambda: captured().get("waiting") == captured().get("labels_waiting") == 0
        )
        kept = captured()
        print(
            f"  demo-005 kept {kept['sampled']} of 201 requests, "
            f"sent {kept['sent']} and {kept['labels']} labels"
        )

        def rows_at_hub() -> int:
            doc = json.loads(run_quiet(outpost, "capture", "status", "--model", "wine", "--json") or "{}")
            return sum(int(v["rows"]) for v in doc.get("versions", []) if v["version"] == 2)

        wait_until("the captured requests at the hub", lambda: rows_at_hub() == kept["sent"])
        run(outpost, "capture", "status", "--model", "wine")
        out = work / "wine-v2.csv"
        run(
            outpost,
            "capture",
            "export",
            "--model",
            "wine",
            "--version",
            "2",
            "--labelled-only",
            "-o",
            f"{out}",
        )
        with out.open(newline="") as f:
            rows = list(csv.DictReader(f))
        print(
            f"  {out.name}: {len(rows)} rows; columns "
            f"{', '.join(list(rows[0])[:8])}, ..., predicted, ..., label"
        )
        assert len(rows) == kept["labels"] > 50, (len(rows), kept)
        right = sum(r["predicted"] == r["label"] for r in rows)
        print(f"  version 2 on the captured, labelled requests: {right} of {len(rows)} right")
        run(outpost, "capture", "stop", "--group", "line")
        wait_until("capture off on the device", lambda: not captured())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def start_hub(
    work: Path, data: Path, mqtt_url: str, name: str, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`outpost-hub serve` on a free loopback port, once it answers /healthz."""
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [
            str(BIN / "outpost-hub"),
            "serve",
            "--data",
            str(data),
            "--listen",
            f"127.0.0.1:{port}",
            "--mqtt",
            mqtt_url,
            *extra,
        ],
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            print((work / f"{name}.log").read_text(), file=sys.stderr)
            raise SystemExit(f"demo: {name} did not start")
        time.sleep(0.05)


def scale_out(work: Path, url: str, hub_data: Path, mqtt_url: str, sample_path: Path) -> None:
    step("11. The hub scaled out: a second hub process on the same database, one deployment through each")
    import requests

    # Its own MQTT client id: two consumers with one id would take the session from each other.
    hub_b, url_b = start_hub(work, hub_data, mqtt_url, "hub-b", "--mqtt-client-id", "demo-hub-b")
    token = (hub_data / "operator.token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    device: subprocess.Popen[bytes] | None = None
    traffic: Traffic | None = None
    try:
        print(f"  hub A {url}, hub B {url_b}: one database, one signing directory, one broker")
        run(str(BIN / "outpost"), "deploy", "wine", "2", "--group", "scale", "--hub", url_b)
        device, sock = start_hub_device(work, "demo-008", "scale", url, hub_data, mqtt_url)
        bodies = sample_requests(sample_path, seed=11)
        traffic = Traffic(sock, bodies[0], bodies[1:])  # probation judges a version on its answers
        wait_until("demo-008 to serve", lambda: call_ready(sock) == 200)
        traffic.thread.start()

        def update() -> dict[str, Any]:
            doc: dict[str, Any] = json.loads(call(sock, "GET", "/v1/status")[2])["update"]
            return doc

        wait_until(
            "demo-008 to commit version 2",
            lambda: "v2" in str(update().get("current")),
        )
        print(
            "  deployed through hub B; device demo-008 polled hub A, verified and committed "
            f"{update()['current']}"
        )
        # Until its first version arrives a new device answers 404: count failures from here on.
        answered, failed = traffic.answers, traffic.failures
        run(str(BIN / "outpost"), "deploy", "wine", "1", "--group", "scale", "--hub", url)
        wait_until("demo-008 to commit version 1", lambda: "v1" in str(update().get("current")))
        print(
            f"  {traffic.answers - answered} predictions while it switched from v2 to v1, "
            f"{traffic.failures - failed} failed"
        )
        assert traffic.failures == failed
        print(
            f"  deployed through hub A; the device now runs {update()['current']}: every signature checks out"
        )

        def recent(hub_url: str) -> list[dict[str, Any]]:
            got = requests.get(
                f"{hub_url}/api/v1/fleet/demo-008", params={"limit": 1000}, headers=auth, timeout=10
            )
            got.raise_for_status()
            rows: list[dict[str, Any]] = got.json()["recent"]
            return rows

        wait_until(
            "demo-008's windows at the hubs", lambda: sum(m["kind"] == "summary" for m in recent(url)) >= 3
        )
        seen_a, seen_b = recent(url), recent(url_b)
        seqs = [m["seq"] for m in seen_a]
        assert len(seqs) == len(set(seqs)), "a message was stored twice"
        assert {m["seq"] for m in seen_b} >= set(seqs), "hub B does not see what hub A stored"
        kinds = sorted({m["kind"] for m in seen_a})
        print(
            f"  demo-008's telemetry, shared by the two consumers: {len(seqs)} messages "
            f"({', '.join(kinds)}), "
            "each stored once, the same through either hub"
        )
    finally:
        if traffic is not None:
            traffic.stop.set()
            if traffic.thread.is_alive():
                traffic.thread.join(10)
        for proc in (device, hub_b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


def ask_over_mqtt(mqtt_url: str, row: np.ndarray) -> dict[str, Any]:
    """An app that speaks MQTT: one OIP request with a response topic and correlation data."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    host, port = mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
    answers: list[dict[str, Any]] = []
    got = threading.Event()
    app = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.properties.CorrelationData == b"demo-1":
            answers.append(json.loads(msg.payload))
            got.set()

    subscribed = threading.Event()
    app.on_message = on_message
    app.on_subscribe = lambda *_args: subscribed.set()
    app.connect(host, int(port))
    app.loop_start()
    try:
        app.subscribe("demo/app/answers", qos=1)
        if not subscribed.wait(10):
            raise SystemExit("demo: the app's subscription was not acknowledged")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "demo/app/answers"
        props.CorrelationData = b"demo-1"
        body = {"inputs": [{"name": "input", "shape": [1, 13], "datatype": "FP32", "data": row.tolist()}]}
        app.publish("outpost/local/demo-005/models/wine/infer", json.dumps(body), qos=1, properties=props)
        if not got.wait(15):
            raise SystemExit("demo: no answer over MQTT")
        return answers[0]
    finally:
        app.loop_stop()
        app.disconnect()


def keep_fleet(work: Path, url: str, hub_data: Path, mqtt_url: str, sample_path: Path) -> None:
    """`make demo-fleet`: the hub, the broker and two devices with traffic stay up until Ctrl-C."""
    step("The demo fleet keeps running: explore it")
    bodies = sample_requests(sample_path, seed=10)
    devices = []
    for name in ("demo-005", "demo-006"):  # their data dirs hold version 2, committed in step 9
        proc, sock = start_hub_device(work, name, "line", url, hub_data, mqtt_url)
        wait_until(f"{name} to serve", lambda sock=sock: call_ready(sock) == 200)
        traffic = Traffic(sock, bodies[0], bodies[1:])
        traffic.thread.start()
        devices.append((proc, traffic))
    token = (hub_data / "operator.token").read_text().strip()
    print(f"  dashboard: {url}/   operator token: {token}")
    print(f"  CLI: export OUTPOST_HUB={url} OUTPOST_TOKEN={token}; outpost fleet; outpost rollout status")
    print(f"  devices demo-005 and demo-006 in group line, with traffic; files in {work}")
    print("  Ctrl-C stops everything")

    def interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping the demo fleet")
    finally:
        for proc, traffic in devices:
            traffic.stop.set()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="outpost-demo-"))
    agent: subprocess.Popen[bytes] | None = None
    hub: subprocess.Popen[bytes] | None = None
    broker: subprocess.Popen[bytes] | None = None
    failed = True
    try:
        v1, v2, sample_path = build_packages(work / "packages")
        sock = str(work / "agent.sock")
        config = work / "agent.toml"
        config.write_text(
            f'device_id = "demo-001"\ngroup = "demo"\ndata_dir = "{work / "data"}"\n'
            f'[server]\nsocket = "{sock}"\n'
        )
        agent = start_agent(work, config, sock, v1)
        body = predict(sock, v1, sample_path)
        switch_and_roll_back(sock, config, v2, body)
        stop_agent(agent, sock)
        agent = None
        broker, mqtt_url = start_broker(work)
        hub, url, hub_data = hub_publish(work, v1, v2, mqtt_url)
        device_updates(work, url, hub_data, v1, body, mqtt_url)
        monitoring(work, mqtt_url, v1, sample_path)
        rollout(work, url, hub_data, mqtt_url, sample_path)
        capture(work, url, hub_data, mqtt_url, sample_path)
        scale_out(work, url, hub_data, mqtt_url, sample_path)
        if "--keep" in sys.argv[1:]:
            keep_fleet(work, url, hub_data, mqtt_url, sample_path)
        hub.terminate()
        hub.wait(30)
        hub = None
        broker.terminate()
        broker.wait(30)
        broker = None
        print("\ndemo finished: all steps behaved as described")
        failed = False
        return 0
    finally:
        for proc in (agent, hub, broker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if failed:  # the logs of every process the demo started are what explains a failed step
            print(f"demo: a step failed; its files and logs are kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_quiet(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=False).stdout


def call_ready(sock: str) -> int:
    try:
        return call(sock, "GET", "/v2/health/ready")[0]
    except OSError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
