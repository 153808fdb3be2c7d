"""Alerting's pure parts: webhook settings, the payload of each format, dashboard links, and the
retry policy (what an answer means, the backoff, when the hub gives up)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hub.alerting import Attempt, Notice, RetryPolicy, WebhookConfigError, parse_webhooks, render
from hub.alerting.payloads import RESOLVED, dashboard_link
from hub.alerting.retry import DELIVERED, PERMANENT, RETRY, classify, next_step, retry_after_s
from hub.settings import HubSettings, SettingsError, load_settings

NOW = datetime(2026, 11, 27, 14, 0, tzinfo=UTC)
HUB = "http://hub.example:8700"


def drift_notice(**changes: Any) -> Notice:
    values: dict[str, Any] = {
        "id": "fleet:drift:dev-7:wine:3:41",
        "kind": "drift",
        "severity": "warning",
        "title": "Input drift: wine v3 on dev-7",
        "text": "dev-7: wine v3 input drift in alcohol (3 windows in a row) <&>",
        "started": NOW,
        "link": dashboard_link(HUB, "drift", "wine", 3),
        "model": "wine",
        "version": 3,
        "group": "lab",
        "device": "dev-7",
        "details": {"count": 1},
    }
    return Notice(**(values | changes))


# -- links --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "model", "version", "link"),
    [
        ("drift", "wine", 3, f"{HUB}/drift/wine/3"),
        ("error_rate", "wine", 3, f"{HUB}/models/wine"),
        ("rollback", "wine", 4, f"{HUB}/models/wine"),
        ("refused", "wine", 4, f"{HUB}/models/wine"),
        ("rollout_halted", "wine", 5, f"{HUB}/models/wine"),
        ("device_offline", None, None, f"{HUB}/"),
        ("rollback", None, None, f"{HUB}/"),
        ("test", None, None, f"{HUB}/"),
        ("drift", "a b/c", 2, f"{HUB}/drift/a%20b%2Fc/2"),
    ],
    ids=["drift", "error-rate", "rollback", "refused", "halt", "offline", "no-model", "test", "quoted"],
)
def test_each_alert_links_the_dashboard_page_that_explains_it(
    kind: str, model: str | None, version: int | None, link: str
) -> None:
    assert dashboard_link(HUB + "/", kind, model, version) == link


# -- payloads -----------------------------------------------------------------------------------


def test_json_payload_is_our_documented_schema() -> None:
    body = render("json", drift_notice())
    assert body == {
        "schema": "outpost.alert/v1",
        "id": "fleet:drift:dev-7:wine:3:41",
        "status": "firing",
        "kind": "drift",
        "severity": "warning",
        "title": "Input drift: wine v3 on dev-7",
        "text": "dev-7: wine v3 input drift in alcohol (3 windows in a row) <&>",
        "model": "wine",
        "version": 3,
        "group": "lab",
        "device": "dev-7",
        "started": "2026-11-27T14:00:00+00:00",
        "ended": None,
        "link": f"{HUB}/drift/wine/3",
        "details": {"count": 1},
    }


def test_slack_payload_is_an_incoming_webhook_message_with_the_link() -> None:
    body = render("slack", drift_notice())
    assert set(body) == {"text", "blocks"}
    assert body["text"].startswith("[WARNING] Input drift: wine v3 on dev-7")
    assert f"{HUB}/drift/wine/3" in body["text"]
    assert [b["type"] for b in body["blocks"]] == ["section", "context", "section"]
    head = body["blocks"][0]["text"]
    assert head["type"] == "mrkdwn"
    assert "&lt;&amp;&gt;" in head["text"] and "<&>" not in head["text"]  # Slack's escaping
    assert body["blocks"][2]["text"]["text"] == f"<{HUB}/drift/wine/3|Open in the Outpost dashboard>"
    assert "lab" in body["blocks"][1]["elements"][0]["text"]


def test_alertmanager_payload_has_labels_annotations_and_the_dashboard_as_generator() -> None:
    (alert,) = render("alertmanager", drift_notice())
    assert alert["labels"] == {
        "alertname": "OutpostDrift",
        "severity": "warning",
        "kind": "drift",
        "model": "wine",
        "version": "3",
        "group": "lab",
        "device": "dev-7",
        "alert_id": "fleet:drift:dev-7:wine:3:41",
    }
    assert all(isinstance(v, str) for v in alert["labels"].values())
    assert alert["annotations"]["summary"] == "Input drift: wine v3 on dev-7"
    assert alert["annotations"]["dashboard"] == f"{HUB}/drift/wine/3"
    assert alert["startsAt"] == "2026-11-27T14:00:00+00:00"
    assert alert["generatorURL"] == f"{HUB}/drift/wine/3"
    assert "endsAt" not in alert


def test_a_resolution_repeats_the_firing_labels_with_ends_at() -> None:
    firing = drift_notice(id="offline:dev-7@3", kind="device_offline", model=None, version=None)
    resolved = drift_notice(
        id="offline:dev-7@3:resolved",
        kind="device_offline",
        model=None,
        version=None,
        status=RESOLVED,
        ended=NOW + timedelta(hours=1),
        details={"resolves": "offline:dev-7@3"},
    )
    (a,), (b,) = render("alertmanager", firing), render("alertmanager", resolved)
    assert a["labels"] == b["labels"]
    assert b["endsAt"] == "2026-11-27T15:00:00+00:00"
    assert render("json", resolved)["status"] == "resolved"
    assert render("slack", resolved)["text"].startswith("[Resolved]")


# -- webhooks in hub.toml -----------------------------------------------------------------------


def test_webhooks_parse_with_defaults() -> None:
    (a, b) = parse_webhooks(
        [
            {"name": "chat", "url": "https://hooks.slack.com/services/T/B/secret", "format": "slack"},
            {"name": "am", "url": "http://127.0.0.1:9093/api/v2/alerts", "format": "alertmanager",
             "min_severity": "critical", "token": "t0k", "headers": {"X-Scope-OrgID": "edge"}},
        ]
    )  # fmt: skip
    assert (a.format, a.min_severity, a.token, dict(a.headers)) == ("slack", "info", "", {})
    assert a.severities() == ("info", "warning", "critical")
    assert b.severities() == ("critical",)
    assert a.describe()["url"] == "https://hooks.slack.com/services/..."  # the secret path is hidden
    assert b.describe()["headers"] == ["X-Scope-OrgID", "Authorization"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"name": "x"}, "array of tables"),
        ([{"url": "http://a/"}], "`name` is missing"),
        ([{"name": "bad name", "url": "http://a/"}], "must be letters"),
        ([{"name": "x", "url": "ftp://a/"}], "http:// or https://"),
        ([{"name": "x", "url": "http://a/", "format": "teams"}], "format must be one of json, slack"),
        ([{"name": "x", "url": "http://a/", "min_severity": "high"}], "min_severity must be one of"),
        ([{"name": "x", "url": "http://a/", "secret": "s"}], "unknown key secret"),
        ([{"name": "x", "url": "http://a/", "headers": {"X-A": "1\n2"}}], "header 'X-A'"),
        ([{"name": "x", "url": "http://a/", "token": 5}], "`token` must be a string"),
        ([{"name": "x", "url": "http://a/"}, {"name": "x", "url": "http://b/"}], "named twice"),
    ],
    ids=["not-a-list", "no-name", "bad-name", "scheme", "format", "severity", "unknown", "header", "token",
         "twice"],
)  # fmt: skip
def test_bad_webhooks_are_refused_with_what_to_fix(entries: Any, message: str) -> None:
    with pytest.raises(WebhookConfigError, match=message):
        parse_webhooks(entries)


def test_hub_toml_takes_webhooks_as_an_array_of_tables(tmp_path: Path) -> None:
    text = HubSettings(tmp_path).to_toml() + (
        '\n[[webhooks]]\nname = "ops"\nurl = "http://127.0.0.1:9/hook"\nformat = "slack"\n'
        'headers = { "X-Team" = "edge" }\n'
    )
    (tmp_path / "hub.toml").write_text(text)
    settings = load_settings(tmp_path)
    assert [w.name for w in settings.webhooks] == ["ops"]
    # Written back (init writes hub.toml with to_toml), the tables come last and read the same.
    (tmp_path / "hub.toml").write_text(settings.to_toml())
    assert load_settings(tmp_path).webhooks == settings.webhooks
    (tmp_path / "hub.toml").write_text(text.replace('"slack"', '"teams"'))
    with pytest.raises(SettingsError, match=r"hub\.toml: webhook 'ops': format must be one of"):
        load_settings(tmp_path)


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "outcome"),
    [
        (Attempt(200), DELIVERED),
        (Attempt(204), DELIVERED),
        (Attempt(None, "cannot connect"), RETRY),
        (Attempt(None, "no answer within 10 s"), RETRY),
        (Attempt(500), RETRY),
        (Attempt(503), RETRY),
        (Attempt(429), RETRY),
        (Attempt(408), RETRY),
        (Attempt(400), PERMANENT),
        (Attempt(401), PERMANENT),
        (Attempt(404), PERMANENT),
        (Attempt(301), PERMANENT),
    ],
    ids=["200", "204", "refused", "timeout", "500", "503", "429", "408", "400", "401", "404", "301"],
)
def test_what_an_answer_means(attempt: Attempt, outcome: str) -> None:
    assert classify(attempt) == outcome


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RetryPolicy(base_s=2, max_backoff_s=30)
    assert [policy.backoff(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert policy.backoff(10_000) == 30


@pytest.mark.parametrize(
    ("attempts", "age_s", "attempt", "state", "delay", "error"),
    [
        (1, 0, Attempt(204), "delivered", 0, ""),
        (1, 0, Attempt(503, "busy"), "pending", 2, "HTTP 503: busy"),
        (3, 0, Attempt(None, "cannot connect: refused"), "pending", 8, "cannot connect: refused"),
        (1, 0, Attempt(429, "", "120"), "pending", 120, "HTTP 429"),  # Retry-After honoured
        (1, 0, Attempt(503, "", "1"), "pending", 2, "HTTP 503"),  # ... never shorter than the backoff
        (1, 0, Attempt(429, "", "99999"), "pending", 3600, "HTTP 429"),  # ... capped
        (1, 0, Attempt(429, "", "Fri, 27 Nov 2026 14:05:00 GMT"), "pending", 300, "HTTP 429"),
        (1, 0, Attempt(400, "bad payload"), "failed", 0, "HTTP 400: bad payload (not retried)"),
        (5, 0, Attempt(503), "failed", 0, "HTTP 503 (gave up after 5 attempts)"),
        (2, 86399, Attempt(503), "failed", 0, "HTTP 503 (gave up: older than 86400 s)"),
    ],
    ids=["ok", "503", "conn", "retry-after", "retry-after-short", "retry-after-cap", "retry-after-date",
         "400", "attempts", "age"],
)  # fmt: skip
def test_after_an_attempt(
    attempts: int, age_s: float, attempt: Attempt, state: str, delay: float, error: str
) -> None:
    policy = RetryPolicy(max_attempts=5, base_s=2, max_backoff_s=300, max_age_s=86400)
    step = next_step(policy, attempts, age_s, attempt, NOW)
    assert (step.state, step.delay_s, step.error) == (state, delay, error)


def test_retry_after_values() -> None:
    assert retry_after_s("30", NOW) == 30
    assert retry_after_s("Fri, 27 Nov 2026 13:00:00 GMT", NOW) == 0  # in the past: now
    assert retry_after_s("soon", NOW) is None
    assert retry_after_s(None, NOW) is None


def test_the_readme_hub_toml_example_is_valid(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = next(b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[[webhooks]]" in b)
    (tmp_path / "hub.toml").write_text(example)
    settings = load_settings(tmp_path)
    assert [(w.name, w.format, w.min_severity) for w in settings.webhooks] == [
        ("ops-slack", "slack", "warning"),
        ("pager", "alertmanager", "critical"),
    ]
    assert settings.public_url == "https://hub.example.com"


def test_connection_errors_do_not_reveal_the_webhook_secret() -> None:
    from hub.alerting.sender import post_json
    from tests.support.hubproc import free_port

    attempt = post_json(f"http://127.0.0.1:{free_port()}/services/T0/B0/s3cr3t?k=v", {}, {}, 2.0)
    assert attempt.status is None and attempt.error.startswith("cannot connect")
    assert "s3cr3t" not in attempt.error and "k=v" not in attempt.error


def test_slack_section_text_stays_within_slacks_limit() -> None:
    body = render("slack", drift_notice(title="T" * 200, text="<&>" * 2000))
    section = body["blocks"][0]["text"]["text"]
    assert len(section) <= 3000 and section.endswith("...")
    assert section[:-3].endswith(("&lt;", "&amp;", "&gt;"))  # not cut inside an escape
