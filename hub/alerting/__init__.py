"""Alerts out: the hub sends its alerts to webhooks (generic JSON, Slack, Alertmanager).

    notices    drift, error-rate, rollback and refusal alerts (hub.fleet), halted rollouts
               (hub.rollouts), devices offline past a threshold, operator tests
    webhooks   [[webhooks]] in hub.toml, each with a format and a minimum severity
    delivery   one row per notice and webhook; claimed before sending, retried with backoff,
               given up after a number of attempts or an age; nothing kept outside the database

Modules: `webhooks` (pure: the settings), `payloads` (pure: notice -> JSON for each format, the
dashboard link), `retry` (pure: what an answer means, backoff, giving up), `store` (tables, the
claim), `sources` (reads fleet alerts, rollout halts, devices), `sender` (requests), `dispatcher`
(the loop, the test alert).
"""

from hub.alerting.dispatcher import AlertingConfig, Dispatcher, TickReport
from hub.alerting.payloads import (
    Notice,
    alertmanager_payload,
    dashboard_link,
    json_payload,
    render,
    slack_payload,
)
from hub.alerting.retry import Attempt, RetryPolicy, Step, next_step
from hub.alerting.store import Delivery
from hub.alerting.webhooks import Webhook, WebhookConfigError, parse_webhooks

__all__ = [
    "AlertingConfig",
    "Attempt",
    "Delivery",
    "Dispatcher",
    "Notice",
    "RetryPolicy",
    "Step",
    "TickReport",
    "Webhook",
    "WebhookConfigError",
    "alertmanager_payload",
    "dashboard_link",
    "json_payload",
    "next_step",
    "parse_webhooks",
    "render",
    "slack_payload",
]
