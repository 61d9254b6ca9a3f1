#!/bin/sh
# `make test` runs this first: tests/test_serve_page.py drives Debian's headless `chromium`.
# Installs it with apt-get (as root, or through passwordless sudo) when it is missing; where
# that is not possible, says in one line what to do and lets the tests run (the page test then
# fails, naming the same fix).
set -eu
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    SUDO="none"
fi
if [ "$SUDO" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "make test: Debian's chromium (for the page test) is missing and cannot be installed here (needs apt-get as root or passwordless sudo): install it, e.g. 'sudo apt-get install chromium', then run make test again" >&2
    exit 0
fi
echo "make test: installing Debian's chromium for the page test (apt-get)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null 2>&1
