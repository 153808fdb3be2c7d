"""`outpost alerts webhooks | deliveries | test`: where the hub sends its alerts, and how that went
(the hub URL and token from --hub/--token or OUTPOST_HUB/OUTPOST_TOKEN).

    outpost alerts webhooks                      the configured webhooks
    outpost alerts deliveries [--webhook NAME] [--state failed] [--limit N]
    outpost alerts test --webhook NAME           send a test alert now and say how it went
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from hub.alerting.store import STATES
from hub.errors import HubError
from hub.hub_commands import _client, _hub_options, _table


def _when(iso: str | None) -> str:
    return "-" if not iso else iso[:19] + "Z"


def deliveries_text(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        print("no deliveries", file=out)
        return
    table = [["created", "webhook", "state", "tries", "severity", "alert", "last error / delivered"]]
    for d in rows:
        outcome = _when(d["delivered_at"]) if d["state"] == "delivered" else (d.get("last_error") or "-")
        if d["state"] == "pending" and d.get("next_attempt"):
            outcome += f" (next {_when(d['next_attempt'])})"
        table.append(
            [_when(d["created"]), d["webhook"], d["state"], str(d["attempts"]), d.get("severity") or "-",
             d.get("title") or d["alert"], outcome]
        )  # fmt: skip
    _table(table, out, right=frozenset({3}))


def _cmd_webhooks(args: argparse.Namespace, out: TextIO) -> int:
    hooks = _client(args).alert_webhooks()
    if not hooks:
        print("no webhooks configured ([[webhooks]] in the hub's hub.toml)", file=out)
        return 0
    rows = [["name", "format", "min severity", "url", "headers"]]
    for h in hooks:
        rows.append([h["name"], h["format"], h["min_severity"], h["url"], ", ".join(h["headers"]) or "-"])
    _table(rows, out)
    return 0


def _cmd_deliveries(args: argparse.Namespace, out: TextIO) -> int:
    deliveries_text(_client(args).alert_deliveries(args.webhook, args.state, args.limit), out)
    return 0


def _cmd_test(args: argparse.Namespace, out: TextIO) -> int:
    d = _client(args).alert_test(args.webhook)
    if d["state"] == "delivered":
        print(f"test alert delivered to {d['webhook']} ({d['alert']})", file=out)
        return 0
    retry = "; the hub tries again (outpost alerts deliveries)" if d["state"] == "pending" else ""
    raise HubError(f"the test alert to {d['webhook']} was not delivered: {d['last_error']}{retry}")


def add_alert_commands(commands: Any) -> None:
    p = commands.add_parser(
        "alerts",
        help="alerts out: webhooks, deliveries, a test alert",
        description="The hub sends drift, error-rate, rollback, halted-rollout and offline-device alerts "
        "to the webhooks in its hub.toml ([[webhooks]]).",
    )
    sub = p.add_subparsers(dest="alerts_command", metavar="COMMAND", required=True)
    s = sub.add_parser("webhooks", help="the webhooks the hub sends alerts to")
    _hub_options(s)
    s.set_defaults(handler=_cmd_webhooks)
    s = sub.add_parser("deliveries", help="alert deliveries, newest first")
    s.add_argument("--webhook", help="only this webhook")
    s.add_argument("--state", choices=STATES, help="only deliveries in this state")
    s.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _hub_options(s)
    s.set_defaults(handler=_cmd_deliveries)
    s = sub.add_parser("test", help="send a test alert to a webhook now")
    s.add_argument("--webhook", required=True, metavar="NAME")
    _hub_options(s)
    s.set_defaults(handler=_cmd_test)
