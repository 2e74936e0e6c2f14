#!/usr/bin/env bash
# The browser tests need Debian's Chromium and its driver (no test tool may download a browser
# here). Installs them when missing and when we are root; otherwise says what to install, and the
# browser tests then report themselves skipped with that reason.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "install-browser: installing chromium and chromium-driver (about a minute)" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
else
  echo "install-browser: chromium and chromium-driver are missing; install them to run the browser tests" >&2
fi
