"""`outpost-hub`: set up and run the hub.

outpost-hub init --data DIR [--offline-keys DIR]   keys, TUF metadata, database, a token
outpost-hub serve --data DIR [--listen HOST:PORT] [--mqtt URL]
                                                   the API and the TUF repository over HTTP;
                                                   with an MQTT URL, the fleet consumer too
outpost-hub migrate --data DIR                     upgrade the database's schema to this version's
outpost-hub keys rotate ROLE --data DIR            a new key for a role (root: chained)
outpost-hub token create NAME --data DIR           another operator token
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hub import __version__
from hub.errors import HubError
from hub.settings import DEFAULT_LISTEN, SETTINGS_FILE, HubSettings, SettingsError, load_settings

log = logging.getLogger("outpost-hub")


def _cmd_init(args: argparse.Namespace) -> int:
    from hub import migrations
    from hub.registry import BlobStore, Database, Registry
    from hub.signing import OFFLINE_ROLES, ONLINE_ROLES, KeyStore, SignedRepository

    data: Path = args.data
    if (data / SETTINGS_FILE).exists():
        raise HubError(f"{data} already holds a hub ({SETTINGS_FILE} exists); nothing was changed")
    data.mkdir(parents=True, exist_ok=True)
    settings = HubSettings(
        data_dir=data, offline_keys_dir=str(args.offline_keys or ""), database_url=args.database_url
    )
    if args.short_expiry:  # for tests and demos: expiries in seconds, refreshed often
        settings = HubSettings(
            data_dir=data,
            offline_keys_dir=settings.offline_keys_dir,
            database_url=args.database_url,
            refresh_interval_s=1.0,
            timestamp_expiry_s=args.short_expiry,
            snapshot_expiry_s=args.short_expiry * 3,
            delegated_expiry_s=args.short_expiry * 10,
        )
    for directory in (settings.online_keys, settings.offline_keys):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    repo = SignedRepository(
        settings.tuf_dir, KeyStore(settings.online_keys, settings.offline_keys), settings.expiry_policy()
    )
    repo.create()
    db = Database(settings.db_url)
    try:
        migrations.upgrade(db)  # the schema at the newest revision (hub.migrations)
        token = Registry(db, BlobStore(settings.blobs_dir)).create_token("operator")
    finally:
        db.dispose()
    fd = os.open(settings.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    (data / SETTINGS_FILE).write_text(settings.to_toml())
    print(f"hub initialised in {data}")
    print(f"  root metadata for provisioning devices (agent hub.trusted_root): {repo.root_path()}")
    print(
        f"  online keys, the running hub signs with them ({', '.join(ONLINE_ROLES)}): {settings.online_keys}"
    )
    print(f"  offline keys ({', '.join(OFFLINE_ROLES)}): {settings.offline_keys}")
    print("    move these off the hub; they are needed only to rotate keys")
    print(f"  operator token (also in {settings.token_file}, mode 0600): {token}")
    print(f"  start it: outpost-hub serve --data {data}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hub.api import create_app
    from hub.http_protocol import bounded_httptools

    settings = load_settings(args.data)
    if args.mqtt is not None:
        from dataclasses import replace

        settings = replace(settings, mqtt_url=args.mqtt)
    if args.mqtt_client_id:
        from dataclasses import replace

        settings = replace(settings, mqtt_client_id=args.mqtt_client_id)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise HubError(f"--listen: expected HOST:PORT, got {args.listen!r}")
    if not settings.public_url:  # links in alerts point at the address served
        import socket
        from dataclasses import replace

        # On every interface: the machine's name, which a browser elsewhere can open.
        shown = socket.getfqdn() if host in ("0.0.0.0", "[::]", "::") else host
        settings = replace(settings, public_url=f"http://{shown}:{port}")
    if settings.max_header_bytes < 1024:
        raise SettingsError("hub settings: max_header_bytes must be at least 1024")
    app = create_app(settings)
    log.info("serving on http://%s:%s (API /api/v1, TUF /tuf)", host, port)
    # httptools (llhttp, in C) with the request head bounded at max_header_bytes (beyond, 400
    # and the connection closed), as h11 bounds it, at a third of h11's CPU per request
    # (hub.http_protocol); uvicorn's own httptools protocol has no such bound.
    uvicorn.run(
        app,
        host=host.strip("[]"),
        port=int(port),
        log_level="warning",
        access_log=False,
        http=bounded_httptools(settings.max_header_bytes),
    )
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the database to the newest schema revision. Run it once per upgrade of Outpost
    (not from every hub process), after a backup; `serve` refuses a database that is behind."""
    from hub import migrations
    from hub.registry import Database

    settings = load_settings(args.data)
    db = Database(settings.db_url)
    try:
        done = migrations.upgrade(db)
    finally:
        db.dispose()
    if done.adopted:
        print(f"database made before schema migrations adopted: stamped at revision {done.after}")
    elif done.changed:
        print(f"database upgraded from revision {done.before or '(empty)'} to {done.after}")
    else:
        print(f"database already at the newest revision, {done.after}: nothing to do")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    from hub import objectstore
    from hub.registry import Database

    settings = load_settings(args.data)
    # As `serve` builds it: published to the bucket when tuf_publish = "s3", and with
    # tuf_state = "s3" signed on the bucket's current state under the hosts' advisory lock
    # and published before the lock is let go, so a rotation on one host while the others
    # run is theirs at their next sync (they still need the new online key file to sign).
    db = Database(settings.db_url) if settings.tuf_state == "s3" else None
    try:
        repo = objectstore.signed_repository(settings, engine=db.engine if db is not None else None)
        if settings.tuf_state == "s3":
            repo.join()
        rotation = repo.rotate_key(args.role)
    finally:
        if db is not None:
            db.dispose()
    published = ", ".join(f"{role} v{v}" for role, v in rotation.published.items())
    print(f"rotated {rotation.role}: new key {rotation.new_keyid[:16]}…; published {published}")
    if rotation.retired_key is not None:
        print(f"  the old private key was kept at {rotation.retired_key}; destroy it when no longer needed")
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from hub import migrations
    from hub.registry import BlobStore, Database, Registry

    settings = load_settings(args.data)
    db = Database(settings.db_url)
    try:
        migrations.require_current(db, hint=f"outpost-hub migrate --data {args.data}")
        print(Registry(db, BlobStore(settings.blobs_dir)).create_token(args.name))
    finally:
        db.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outpost-hub", description="Outpost hub")
    parser.add_argument("--version", action="version", version=f"outpost-hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create keys, TUF metadata, the database and an operator token")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument(
        "--offline-keys", type=Path, help="where root and targets keys go (default DATA/keys/offline)"
    )
    p.add_argument(
        "--database-url",
        default="",
        metavar="URL",
        help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/outpost (default: SQLite in DATA)",
    )
    p.add_argument("--short-expiry", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("serve", help="run the API and the TUF repository over HTTP")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    p.add_argument(
        "--mqtt",
        metavar="URL",
        help="consume fleet telemetry from this broker, mqtt://HOST:PORT (default: mqtt_url in hub.toml; "
        "empty: no MQTT)",
    )
    p.add_argument(
        "--mqtt-client-id",
        metavar="ID",
        help="this process's MQTT client id (default: mqtt_client_id in hub.toml, else one derived from "
        "the host and the data directory); several hub processes sharing a data directory need one each",
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "migrate",
        help="upgrade the database's schema (once, after a backup; serve refuses a database that is behind)",
    )
    p.add_argument("--data", type=Path, required=True)
    p.set_defaults(func=_cmd_migrate)

    keys = sub.add_parser("keys", help="key management").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("rotate", help="replace a role's key (root rotation is chained)")
    p.add_argument("role", choices=["root", "targets", "snapshot", "timestamp", "models", "deploy"])
    p.add_argument("--data", type=Path, required=True)
    p.set_defaults(func=_cmd_rotate)

    tokens = sub.add_parser("token", help="operator tokens").add_subparsers(
        dest="token_command", required=True
    )
    p = tokens.add_parser("create", help="create an operator token and print it once")
    p.add_argument("name")
    p.add_argument("--data", type=Path, required=True)
    p.set_defaults(func=_cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # `migrate` prints what it did
    try:
        code: int = args.func(args)
    except HubError as exc:
        print(f"outpost-hub: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
