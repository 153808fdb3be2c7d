"""The alerting loop: find new alerts, queue one delivery per webhook, send what is due.

    dispatcher = Dispatcher(db, AlertingConfig(webhooks, public_url="http://hub:8700"))
    dispatcher.create_tables()
    dispatcher.tick()          # collect -> queue -> send (at most `batch` sends)
    dispatcher.start()         # the same every `interval_s`, on a thread of its own
    dispatcher.send_test("ops-slack", actor="ops")

Each step is its own short transaction, and no transaction is open while a request is in
flight. Everything the loop knows is in the database (hub.alerting.store): several hub processes
on one database each run the loop; the unique keys make them queue each delivery once and the
claim makes them send it once. A process keeps only a timer for the retention sweep.

A tick sends at most `batch` deliveries one after another (taking the webhooks in turn), each
bounded by `timeout_s`; the rest wait for the next tick. The loop runs on its own thread, so a
slow webhook never holds the API's event loop or its thread pool.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from hub.alerting import sources, store
from hub.alerting.payloads import TEST, Notice, dashboard_link, render
from hub.alerting.retry import Attempt, RetryPolicy, Step, next_step
from hub.alerting.sender import DEFAULT_TIMEOUT_S, Poster, post_json
from hub.alerting.store import AlertingBase, Delivery, DeliveryRow, NoticeRow
from hub.alerting.webhooks import Webhook
from hub.errors import NotFoundError
from hub.registry import Database

log = logging.getLogger("outpost-hub.alerting")

DEFAULT_INTERVAL_S = 5.0
DEFAULT_BATCH = 50
DEFAULT_OFFLINE_AFTER_S = 900.0
MIN_RETENTION_S = 7 * 86400.0
SWEEP_EVERY_S = 600.0


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AlertingConfig:
    webhooks: tuple[Webhook, ...]
    public_url: str
    offline_after_s: float = DEFAULT_OFFLINE_AFTER_S  # 0: no offline-device alerts
    interval_s: float = DEFAULT_INTERVAL_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    batch: int = DEFAULT_BATCH
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.timeout_s > 0 and self.batch >= 1 and self.offline_after_s >= 0):
            raise ValueError(
                "alert_interval_s and alert_timeout_s must be > 0, alert_batch >= 1, "
                "alert_offline_after_s >= 0"
            )

    @property
    def lease_s(self) -> float:
        """How long a claim holds: well past one request's timeout."""
        return 3 * self.timeout_s + 30.0


@dataclass
class TickReport:
    noticed: int = 0
    queued: int = 0
    sent: int = 0
    delivered: int = 0
    failed: int = 0


class Dispatcher:
    def __init__(
        self,
        db: Database,
        config: AlertingConfig,
        *,
        poster: Poster = post_json,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.db = db
        self.config = config
        self.hooks: Mapping[str, Webhook] = {h.name: h for h in config.webhooks}
        self.poster = poster
        self.clock = clock
        self.sources = sources.SourceConfig(config.public_url, config.offline_after_s, config.batch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept_at: datetime | None = None

    def create_tables(self) -> None:
        AlertingBase.metadata.create_all(self.db.engine)

    # -- one tick -----------------------------------------------------------------------------

    def tick(self) -> TickReport:
        report = TickReport()
        if not self.hooks:
            return report
        now = self.clock()
        since = now - timedelta(seconds=self.config.policy.max_age_s)
        with self.db.session(write=True) as s:
            report.noticed += sources.fleet_alerts(s, since, now, self.sources)
            report.noticed += sources.fleet_escalations(s, since, now, self.sources)
            report.noticed += sources.rollout_halts(s, since, now, self.sources)
            report.noticed += sources.offline_devices(s, since, now, self.sources)
        with self.db.session(write=True) as s:
            for hook in self.hooks.values():
                report.queued += store.enqueue(s, hook.name, hook.severities(), since, now, self.config.batch)
        with self.db.session() as s:
            queues = {name: store.due(s, [name], now, self.config.batch) for name in self.hooks}
        # Round robin over the webhooks, `batch` sends in all: one webhook's backlog does not starve
        # the others; one that fails with a retryable error is not tried again in this tick (its
        # other deliveries stay due, for the next tick), so a dead webhook costs one timeout a tick.
        while report.sent < self.config.batch and any(queues.values()):
            for queue in queues.values():
                if not queue or report.sent >= self.config.batch:
                    continue
                step = self.deliver(queue.pop(0))
                if step is None:
                    continue
                report.sent += 1
                report.delivered += step.state == store.DELIVERED
                report.failed += step.state == store.FAILED
                if step.state == store.PENDING:
                    queue.clear()
        self._sweep(now)
        return report

    def deliver(self, delivery_id: int) -> Step | None:
        """Claim one delivery, send it, record the result; None if someone else holds it."""
        token = secrets.token_hex(16)
        now = self.clock()
        with self.db.session(write=True) as s:
            if not store.claim(s, delivery_id, token, now, self.config.lease_s):
                return None
            row = s.get(DeliveryRow, delivery_id, populate_existing=True)
            assert row is not None
            attempts, created, webhook = row.attempts, row.created, row.webhook
            notice = store.get_notice(s, row.notice_key)
        hook = self.hooks.get(webhook)
        if notice is None or hook is None:
            attempt = Attempt(None, "its alert or webhook is gone")
            step = Step(store.FAILED, error=attempt.error)
        else:
            try:
                body = render(hook.format, notice)
                attempt = self.poster(hook.url, body, _headers(hook, notice), self.config.timeout_s)
            except Exception as exc:  # a bug, not the network (the poster maps that): record it, once
                log.exception("alert %s to webhook %s: sending failed", notice.id, webhook)
                attempt = Attempt(None, f"internal error: {type(exc).__name__}: {exc}")
                step = Step(store.FAILED, error=attempt.error)
            else:
                now = self.clock()
                step = next_step(self.config.policy, attempts, (now - created).total_seconds(), attempt, now)
        with self.db.session(write=True) as s:
            if not store.finish(s, delivery_id, token, step, attempt.status, now):
                log.warning(
                    "delivery %d to %s: the claim expired before the answer came", delivery_id, webhook
                )
        if step.state == store.FAILED:
            log.warning(
                "alert %s to webhook %s failed: %s", notice.id if notice else "?", webhook, step.error
            )
        elif step.state == store.PENDING:
            log.info("alert %s to webhook %s: %s; retrying in %.1f s", notice.id if notice else "?", webhook,
                     step.error, step.delay_s)  # fmt: skip
        else:
            log.info("alert %s delivered to webhook %s", notice.id if notice else "?", webhook)
        return step

    def _sweep(self, now: datetime) -> None:
        """Delete notices and deliveries well past the retry age (at most every SWEEP_EVERY_S)."""
        if self._swept_at is not None and (now - self._swept_at).total_seconds() < SWEEP_EVERY_S:
            return
        self._swept_at = now
        cutoff = now - timedelta(seconds=max(MIN_RETENTION_S, 2 * self.config.policy.max_age_s))
        with self.db.session(write=True) as s:
            s.execute(delete(DeliveryRow).where(DeliveryRow.created < cutoff))
            s.execute(delete(NoticeRow).where(NoticeRow.created < cutoff, NoticeRow.open.is_(False)))

    # -- operator -----------------------------------------------------------------------------

    def send_test(self, webhook: str, actor: str) -> Delivery:
        """Queue a test alert to one webhook and try it now; its delivery as it stands after."""
        hook = self.hooks.get(webhook)
        if hook is None:
            known = ", ".join(sorted(self.hooks)) or "none configured ([[webhooks]] in hub.toml)"
            raise NotFoundError(f"there is no webhook {webhook!r}; webhooks: {known}")
        now = self.clock()
        notice = Notice(
            id=f"{TEST}:{uuid.uuid4().hex}",
            kind=TEST,
            severity="info",
            title="Test alert from the Outpost hub",
            text=f"{actor} sent this test to the webhook {webhook!r}; alerts reach it.",
            started=now,
            link=dashboard_link(self.config.public_url, TEST),
            details={"actor": actor},
        )
        with self.db.session(write=True) as s:
            store.add_notice(s, notice, TEST, notice.id.split(":", 1)[1], now)
            store.add_delivery(s, notice.id, webhook, now)
            delivery_id = s.scalars(select(DeliveryRow.id).where(DeliveryRow.notice_key == notice.id)).one()
        self.deliver(delivery_id)
        return self.deliveries(alert=notice.id)[0]

    def deliveries(
        self, webhook: str | None = None, state: str | None = None, alert: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        with self.db.session() as s:
            return store.select_deliveries(s, webhook, state, alert, limit)

    def webhooks(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self.config.webhooks]

    # -- the loop -----------------------------------------------------------------------------

    def start(self) -> None:
        if not self.hooks or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="outpost-alerting", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.timeout_s + 5.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.tick()
                if report.noticed or report.sent:
                    log.debug("alerting tick: %s", report)
            except Exception:
                log.exception("the alerting tick failed; trying again in %.1f s", self.config.interval_s)
            self._stop.wait(self.config.interval_s)


def _headers(hook: Webhook, notice: Notice) -> dict[str, str]:
    headers = {"Idempotency-Key": notice.id, "X-Outpost-Alert": notice.id, **hook.headers}
    if hook.token:
        headers["Authorization"] = f"Bearer {hook.token}"
    return headers
