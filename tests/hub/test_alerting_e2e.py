"""Alerts out with the real hub process: webhooks from hub.toml, a test alert through the CLI, a
fleet alert delivered after a 503 with the dashboard link of the address served, the operator
API's deliveries, and a restarted hub that does not send again."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hub.fleet import FleetStore, Incoming, parse_message
from hub.registry import Database
from tests.support.hubproc import HUB_BIN, HubProcess, free_port
from tests.support.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


def fallback(device: str, seq: int) -> Incoming:
    ref = {"model": "wine", "version": 4, "sha256": "cd" * 32}
    doc = {
        "device_id": device,
        "seq": seq,
        "ts": 1.0,
        "event": "update",
        "transition": "crash_loop",
        "version": ref,
    }
    parsed = parse_message(f"outpost/v1/lab/{device}/event", json.dumps(doc).encode())
    assert parsed is not None
    return Incoming(parsed)


def test_hub_sends_alerts_to_its_webhooks_once(tmp_path: Path, receiver: Receiver) -> None:
    hub = HubProcess(tmp_path / "hub")
    hub.set_settings(alert_interval_s=0.2, alert_backoff_s=0.2, alert_backoff_max_s=1.0)
    with (hub.data / "hub.toml").open("a") as f:  # tables after every top-level key
        f.write(
            f'[[webhooks]]\nname = "chat"\nurl = "{receiver.url}/slack"\nformat = "slack"\n\n'
            f'[[webhooks]]\nname = "ops"\nurl = "{receiver.url}/json"\ntoken = "t0k"\n\n'
            f'[[webhooks]]\nname = "broken"\nurl = "{receiver.url}/broken"\n'
        )
    hub.start()
    try:
        listed = hub.outpost("alerts", "webhooks").stdout
        assert "chat" in listed and "slack" in listed and "t0k" not in listed

        result = hub.outpost("alerts", "test", "--webhook", "chat")
        assert "test alert delivered to chat" in result.stdout
        (slack,) = receiver.bodies("/slack")
        assert slack["text"].startswith("[INFO] Test alert from the Outpost hub")
        assert f"<{hub.url}/|Open in the Outpost dashboard>" in json.dumps(slack["blocks"])
        assert receiver.at("/json") == []  # a test goes to the webhook named only
        missing = hub.outpost("alerts", "test", "--webhook", "nope", check=False)
        assert missing.returncode == 2 and "there is no webhook 'nope'" in missing.stderr

        receiver.script("/json", 503)
        receiver.script("/broken", 400)
        db = Database(f"sqlite:///{hub.data / 'hub.db'}")
        FleetStore(db).apply([fallback("dev-1", 1)])  # as the hub's MQTT consumer stores it
        db.dispose()
        got = receiver.wait_for("/json", 2)
        assert [r.status for r in got] == [503, 200]
        body = got[1].body
        assert (body["kind"], body["severity"], body["device"]) == ("rollback", "critical", "dev-1")
        assert body["link"] == f"{hub.url}/models/wine"
        assert got[1].headers["Authorization"] == "Bearer t0k"
        slack_alert = receiver.wait_for("/slack", 2)[1].body
        assert "fell back" in slack_alert["text"]

        ops = hub.api("GET", "/api/v1/alerting/deliveries", params={"webhook": "ops"}).json()
        assert [(d["alert"], d["state"], d["attempts"]) for d in ops] == [
            ("fleet:rollback:dev-1:1", "delivered", 2)
        ]
        assert hub.api("GET", "/api/v1/alerting/deliveries", params={"state": "nope"}).status_code == 400
        assert "delivered" in hub.outpost("alerts", "deliveries", "--webhook", "ops").stdout

        receiver.wait_for("/broken", 1)
        browser = requests.Session()  # the dashboard's fleet page shows the delivery that failed
        assert browser.post(hub.url + "/login", data={"token": hub.token}, timeout=10).status_code == 200
        page = browser.get(hub.url + "/", timeout=10).text
        assert "Alerts out" in page and "Sent to chat, ops, broken" in page
        (row,) = re.findall(r'<tr data-delivery="\d+">(.*?)</tr>', page, re.S)
        assert "broken" in row and "failed" in row and "HTTP 400" in row
        assert f'href="{hub.url}/models/wine"' in row
    finally:
        assert hub.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown

    hub.start()  # a restarted hub: nothing is sent again
    try:
        time.sleep(1.5)  # several ticks
        assert len(receiver.at("/json")) == 2 and len(receiver.at("/slack")) == 2
    finally:
        assert hub.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown


def test_two_hub_processes_on_one_database_send_each_alert_once(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub")
    hub.set_settings(alert_interval_s=0.1, alert_backoff_s=0.2, alert_backoff_max_s=1.0)
    with Receiver(delay_s=0.02) as rx:
        with (hub.data / "hub.toml").open("a") as f:
            f.write(f'[[webhooks]]\nname = "ops"\nurl = "{rx.url}/json"\n')
        rx.script("/json", 503, 503, 503, 429)
        port = free_port()
        with (tmp_path / "second.log").open("ab") as log:
            second = subprocess.Popen(
                [HUB_BIN, "serve", "--data", str(hub.data), "--listen", f"127.0.0.1:{port}"],
                stdout=log,
                stderr=log,
            )
        hub.start()
        try:
            db = Database(f"sqlite:///{hub.data / 'hub.db'}")
            FleetStore(db).apply([fallback(f"dev-{i}", i) for i in range(1, 31)])
            db.dispose()
            deadline = time.monotonic() + 60
            while sum(r.status == 200 for r in rx.at("/json")) < 30 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # ten more ticks of each hub: nothing more comes
            delivered = [r.headers["Idempotency-Key"] for r in rx.at("/json") if r.status == 200]
            assert sorted(delivered) == sorted(f"fleet:rollback:dev-{i}:{i}" for i in range(1, 31))
            assert len(rx.at("/json")) == 34  # and each scripted failure was retried once
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
            hub.stop()
    logs = hub.log() + (tmp_path / "second.log").read_text()
    assert logs.count("delivered to webhook ops") == 30
