#!/usr/bin/env bash
# tests/test_prometheus.py runs Debian's Prometheus and promtool (no test tool may download one
# here). Installs the package when it is missing and we are root; otherwise says what to install.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "install-prometheus: installing Debian's prometheus (it brings promtool)" >&2
  apt-get update -q >/dev/null
  # The package's own service must not start (Debian's policy-rc.d, exit 101: "not allowed"): the
  # tests start the Prometheus they need on a loopback port, and stop it.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
else
  echo "install-prometheus: prometheus is missing; install Debian's prometheus package" >&2
  exit 1
fi
