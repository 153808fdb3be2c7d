"""hub.migrations: the revisions give exactly the models' schema, keep data across upgrades and
downgrades, and the hub's commands use them (init upgrades, serve refuses a database not at head,
migrate upgrades). On SQLite and on PostgreSQL (`database_url`, tests/conftest.py).

A model change without a revision fails `test_upgrade_head_gives_exactly_the_models_schema`; a new
declarative base that hub.migrations does not list fails `test_every_table_of_the_hub_is_migrated`.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from hub import migrations
from hub.errors import SchemaError
from hub.registry import Database
from hub.server_cli import main as hub_main
from hub.settings import load_settings
from tests.support.hubproc import HubProcess
from tests.support.packages import affine_package

BASELINE = "0001"
HUB = Path(migrations.__file__).parent.parent


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url)
    yield d
    d.dispose()


def hub_tables(db: Database) -> set[str]:
    with db.connect() as conn:
        return set(inspect(conn).get_table_names()) - {migrations.VERSION_TABLE}


def model_tables() -> set[str]:
    return {name for md in migrations.metadata() for name in md.tables}


def test_upgrade_head_gives_exactly_the_models_schema(db: Database) -> None:
    done = migrations.upgrade(db)
    assert (done.before, done.after, done.adopted) == (None, migrations.head(), False)
    with db.connect() as conn:
        assert migrations.differences_from_models(conn) == []
    assert hub_tables(db) == model_tables()
    migrations.require_current(db)
    again = migrations.upgrade(db)
    assert not again.changed


def test_every_table_of_the_hub_is_migrated() -> None:
    """Every module of hub/ that declares a base of tables has its metadata listed."""
    import importlib

    listed = {id(md) for md in migrations.metadata()}
    found = []
    for path in sorted(HUB.rglob("*.py")):
        for name in re.findall(r"^class (\w+)\(DeclarativeBase\)", path.read_text(), re.MULTILINE):
            module = ".".join(path.relative_to(HUB.parent).with_suffix("").parts)
            found.append((module, name))
    assert len(found) >= 4, found
    missing = [
        f"{m}.{n}" for m, n in found if id(getattr(importlib.import_module(m), n).metadata) not in listed
    ]
    assert not missing, f"add these to hub.migrations.metadata() and write a revision: {missing}"


ROWS: dict[str, dict[str, Any]] = {
    # The baseline's tables, written with plain SQL: the models may move on, these rows may not.
    "models": {"id": 1, "name": "wine", "last_version": 2, "created": datetime(2026, 1, 2, 3, 4, 5)},
    "model_versions": {
        "id": 1, "model_id": 1, "version": 2, "manifest": "{}", "manifest_sha256": "a" * 64,
        "manifest_size": 2, "model_sha256": "b" * 64, "model_size": 10, "created": datetime(2026, 1, 2),
    },
    "groups": {"id": 1, "name": "lab", "created": datetime(2026, 1, 2)},
    "deployments": {
        "group_id": 1, "model_id": 1, "stable_version": 2, "candidate_version": None, "percent": 0,
        "salt": "s", "previous_stable": None, "metadata_version": 3, "created": datetime(2026, 1, 3),
        "created_by": "ops", "experiment": None, "capture": '{"max_rows_per_min": 5, "sample_bp": 100}',
    },
    "tokens": {"id": 1, "name": "ops", "sha256": "c" * 64, "created": datetime(2026, 1, 2), "revoked": None},
    "devices": {
        "device_id": "d1", "group": "lab", "online": True, "bd_seq": 1, "last_seen": None, "state": "{}",
        "last_seq": 9, "pruned_seq": None,
    },
}  # fmt: skip


def write_rows(db: Database, only: str | None = None) -> None:
    with db.connect(write=True) as conn:
        for table, row in ROWS.items():
            if only not in (None, table):
                continue
            cols = ", ".join(f'"{c}"' for c in row)
            conn.execute(
                text(f"INSERT INTO {table} ({cols}) VALUES ({', '.join(':' + c for c in row)})"), row
            )


def read_rows(db: Database) -> dict[str, dict[str, Any]]:
    got = {}
    with db.connect() as conn:
        for table, row in ROWS.items():
            cols = ", ".join(f'"{c}"' for c in row)
            found = conn.execute(text(f"SELECT {cols} FROM {table}")).mappings().all()
            assert len(found) == 1, (table, found)
            got[table] = dict(found[0])
    return got


# A revision after the ones shipped, as a later release would add: a column on deployments. On
# SQLite the drop is a batch copy of the table (what any ALTER SQLite cannot do takes); on
# PostgreSQL both are ALTERs (recreate="always" would copy there too, and restart the id sequence:
# serials reused, which the test below catches).
LATER = """
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None
KEEP = {{"sqlite_autoincrement": True}}  # or the copy of deployments loses AUTOINCREMENT


def upgrade() -> None:
    with op.batch_alter_table("deployments", table_kwargs=KEEP) as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments", table_kwargs=KEEP) as batch:
        batch.drop_column("note")
"""


@pytest.fixture(params=["shipped", "with-a-later-revision"])
def scripts(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The revisions tested: the ones shipped, or those plus LATER (in a copy of hub/migrations)."""
    if request.param == "shipped":
        return migrations.head()
    copy = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "versions" / "9999_later.py").write_text(LATER.format(head=migrations.head()))
    monkeypatch.setattr(migrations, "SCRIPT_DIR", copy)
    return "9999"


def test_data_survives_every_upgrade_and_downgrade_from_the_baseline(db: Database, scripts: str) -> None:
    """Rows written at the baseline survive the upgrade to head, each revision's downgrade and
    upgrade again; and down to nothing and back gives the models' schema again."""
    assert migrations.upgrade(db, BASELINE).after == BASELINE
    write_rows(db)
    before = read_rows(db)
    assert migrations.upgrade(db).after == scripts
    assert read_rows(db) == before
    script = ScriptDirectory.from_config(migrations.config())
    later = [r for r in script.walk_revisions(base=BASELINE, head="heads") if r.revision != BASELINE]
    assert len(later) == len(list(script.walk_revisions())) - 1
    for rev in later:  # newest first: down one revision at a time, each keeping the rows
        assert isinstance(rev.down_revision, str)
        migrations.downgrade(db, rev.down_revision)
        assert migrations.current(db) == rev.down_revision
        assert read_rows(db) == before
    migrations.upgrade(db)
    assert read_rows(db) == before
    with db.connect(write=True) as conn:  # a deployment's serial is never reused, copies or not
        conn.execute(text("DELETE FROM deployments"))
    write_rows(db, only="deployments")
    with db.connect() as conn:
        assert conn.execute(text("SELECT id FROM deployments")).scalar() == 2
    migrations.downgrade(db, "base")
    assert hub_tables(db) == set() and migrations.current(db) is None
    migrations.upgrade(db)


def test_two_upgrades_at_once_apply_each_revision_once(database_url: str) -> None:
    """Two `outpost-hub migrate` (or init) at the same moment: one upgrades, the other waits for
    it (SQLite: BEGIN IMMEDIATE; PostgreSQL: the advisory lock) and finds nothing to do."""
    dbs = [Database(database_url), Database(database_url)]
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = migrations.upgrade(dbs[i])
        except Exception as exc:  # collected for the assertion
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert all(isinstance(r, migrations.Upgrade) for r in results), results
        assert sorted(r.changed for r in results) == [False, True], results
        assert migrations.current(dbs[0]) == migrations.head()
    finally:
        for d in dbs:
            d.dispose()


def test_a_batch_copy_that_loses_autoincrement_is_a_difference(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    migrations.upgrade(db)
    with db.connect(write=True) as conn:
        conn.execute(text("CREATE TABLE d2 AS SELECT * FROM deployments"))
        conn.execute(text("DROP TABLE deployments"))
        conn.execute(text("ALTER TABLE d2 RENAME TO deployments"))
        assert ("sqlite_autoincrement_lost", "deployments") in migrations.differences_from_models(conn)
    db.dispose()


def test_a_database_made_before_migrations_is_adopted_only_when_it_matches(db: Database) -> None:
    for md in migrations.metadata():
        md.create_all(db.engine)
    with pytest.raises(
        SchemaError, match="made before schema migrations; adopt it with: outpost-hub migrate"
    ):
        migrations.require_current(db)
    done = migrations.upgrade(db)
    assert done.adopted and done.after == migrations.head()
    migrations.require_current(db)
    # One that does not match is refused, and left as it was.
    migrations.downgrade(db, "base")
    with db.connect(write=True) as conn:
        conn.execute(text("CREATE TABLE models (id INTEGER PRIMARY KEY, name VARCHAR(10))"))
    with pytest.raises(SchemaError, match="differ from this hub's schema"):
        migrations.upgrade(db)
    assert hub_tables(db) == {"models"} and migrations.current(db) is None


def test_require_current_says_what_is_wrong_and_what_to_do(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SchemaError, match=r"holds no hub schema; create it with: outpost-hub migrate"):
        migrations.require_current(db)
    migrations.upgrade(db)
    at = migrations.head()
    monkeypatch.setattr(migrations, "head", lambda: "0999")  # this code is newer than the database
    with pytest.raises(SchemaError, match=rf"at schema revision {at}, this hub needs 0999: back it up"):
        migrations.require_current(db, hint="outpost-hub migrate --data /srv/hub")
    monkeypatch.undo()
    with db.connect(write=True) as conn:  # a newer Outpost migrated it
        conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '0999'"))
    with pytest.raises(SchemaError, match=r"0999, which this hub .* does not know: a newer Outpost"):
        migrations.require_current(db)
    with pytest.raises(SchemaError, match="0999, which this hub does not know"):
        migrations.upgrade(db)


def test_init_migrates_serve_refuses_a_database_behind_and_migrate_upgrades_it(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "hub"
    assert hub_main(["init", "--data", str(data), "--database-url", database_url]) == 0
    db = Database(load_settings(data).db_url)
    try:
        assert migrations.current(db) == migrations.head()
        migrations.downgrade(db, "base")  # as if made by an older release: behind head
        capsys.readouterr()
        assert hub_main(["serve", "--data", str(data), "--listen", "127.0.0.1:1"]) == 1
        err = capsys.readouterr().err
        assert f"create it with: outpost-hub migrate --data {data}" in err, err
        assert hub_main(["token", "create", "ci", "--data", str(data)]) == 1
        assert hub_main(["migrate", "--data", str(data)]) == 0
        assert f"upgraded from revision (empty) to {migrations.head()}" in capsys.readouterr().out
        assert hub_main(["migrate", "--data", str(data)]) == 0
        assert "already at the newest revision" in capsys.readouterr().out
        assert hub_main(["token", "create", "ci", "--data", str(data)]) == 0
    finally:
        db.dispose()


@pytest.mark.postgres
def test_a_hub_on_postgresql_end_to_end(tmp_path: Path, postgres_url: str) -> None:
    """`init --database-url` on PostgreSQL, then the real hub process: the token, push, deploy,
    the fleet and rollout APIs and the dashboard's pages all read and write PostgreSQL."""
    hub = HubProcess(tmp_path / "hub", database_url=postgres_url).start()
    try:
        hub.outpost("push", str(affine_package(tmp_path / "affine")), "--quiet")
        hub.outpost("deploy", "affine", "1", "--group", "lab")
        dep = hub.api("GET", "/api/v1/groups/lab")
        assert dep.status_code == 200 and dep.json()["current"]["stable"] == 1, dep.text
        assert hub.api("GET", "/api/v1/fleet").json() == []
        assert hub.api("GET", "/api/v1/rollouts").status_code == 200
        login = requests.post(
            hub.url + "/login", data={"token": hub.token}, allow_redirects=False, timeout=10
        )
        assert login.status_code == 303, login.text
        for page in ("/", "/models", "/models/affine", "/experiments", "/drift/affine/1?since=1h"):
            resp = requests.get(hub.url + page, cookies=login.cookies, timeout=10)
            assert resp.status_code == 200 and "<html" in resp.text, (page, resp.status_code, resp.text[:300])
    finally:
        hub.stop()
    db = Database(postgres_url)
    try:
        with db.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM deployments")).scalar() == 1
    finally:
        db.dispose()


def test_revision_0003_sums_the_stored_windows_into_the_error_buckets(db: Database) -> None:
    """fleet_error_buckets starts with the summary windows already stored, per model, version and
    bucket of the default 300 s (hub.fleet.buckets); drift windows are not counted."""
    migrations.upgrade(db, "0002")
    windows = [  # seq, kind, version, window end, requests, errors
        (1, "summary", 3, 310.0, 10, 1), (2, "summary", 3, 599.5, 20, 2), (3, "summary", 3, 600.0, 5, 5),
        (4, "summary", 4, 320.0, 7, 0), (5, "drift", 3, 330.0, 0, 0), (6, "summary", 3, -10.0, 1, 1),
    ]  # fmt: skip
    with db.connect(write=True) as conn:
        for seq, kind, version, end, requests, errors in windows:
            conn.execute(
                text(
                    'INSERT INTO fleet_windows (device_id, seq, kind, "group", model, version, window_start, '
                    "window_end, received, requests, errors, n_rows, alert, body) VALUES ('d1', :seq, :kind, "
                    "'plant', 'wine', :version, :start, :end, :at, :requests, :errors, 0, NULL, '{}')"
                ),
                {"seq": seq, "kind": kind, "version": version, "start": end - 60, "end": end,
                 "at": datetime(2024, 1, 1), "requests": requests, "errors": errors},
            )  # fmt: skip
    migrations.upgrade(db)
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT model, version, window_s, bucket, windows, requests, errors FROM fleet_error_buckets"
            )
        )
        got = {(m, int(v), float(s), float(b)): (int(n), int(r), int(e)) for m, v, s, b, n, r, e in rows}
    assert got == {
        ("wine", 3, 300.0, 300.0): (2, 30, 3),
        ("wine", 3, 300.0, 600.0): (1, 5, 5),
        ("wine", 4, 300.0, 300.0): (1, 7, 0),
        ("wine", 3, 300.0, -300.0): (1, 1, 1),
    }
    migrations.downgrade(db, "0002")
    assert "fleet_error_buckets" not in hub_tables(db) and "fleet_windows" in hub_tables(db)
