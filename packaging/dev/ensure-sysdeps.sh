#!/usr/bin/env bash
# Installs the Debian packages that `make test` and `make demo` use, when missing
# (Mosquitto, systemd-analyze, Chromium for the dashboard's browser test, PostgreSQL for the
# hub's database tests).
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# The dashboard's browser test drives Debian's Chromium through Playwright (tests/hub/test_dashboard.py).
[ -x /usr/bin/chromium ] || need+=(chromium)
# The hub's database tests start a private PostgreSQL cluster (tests/support/postgres.py).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 || need+=(postgresql)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "outpost: missing system packages: ${need[*]}" >&2
    echo "outpost: install them with: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "outpost: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
