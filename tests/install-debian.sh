#!/usr/bin/env bash
# The Debian packages the tests run for real (no test tool may download a browser or a server
# here): Chromium and its driver for the page (tests/test_browser.py), Prometheus with promtool for
# the alert rules and a real scrape (tests/test_prometheus.py), and redis-server for the shared
# stream log (tests/test_redis.py). Installs what is missing, in one apt run, when we are root;
# otherwise says what to install and fails.
set -euo pipefail
# command the tests run -> the package that brings it
declare -A needs=([chromium]=chromium [chromedriver]=chromium-driver [prometheus]=prometheus
  [promtool]=prometheus [redis-server]=redis-server)
missing=()
for command in "${!needs[@]}"; do
  command -v "$command" >/dev/null || missing+=("${needs[$command]}")
done
[ ${#missing[@]} = 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-debian: missing ${missing[*]}; install these Debian packages to run the tests" >&2
  exit 1
fi
echo "install-debian: installing ${missing[*]} (a minute or two)" >&2
apt-get update -q >/dev/null
# The packages' own services (prometheus, redis-server) must not start (Debian's policy-rc.d,
# exit 101: "not allowed"): the tests start the servers they need on loopback ports, and stop them.
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
