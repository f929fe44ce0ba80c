#!/usr/bin/env bash
# System packages for the `gui` extra (MiniWoB++ in headless Chromium, see shared/STACK.md): Debian's `chromium`,
# its matching `chromium-driver`, and `fonts-liberation` (Arial-compatible metrics, so MiniWoB pages lay out as
# upstream; Debian's chromium only recommends it). Idempotent: does nothing when /usr/bin/chromium,
# /usr/bin/chromedriver and the Liberation fonts are already there. Installs with apt-get (no recommended packages)
# when run as root; otherwise prints the command and exits 1. It never calls sudo itself.
#
#   bash cluster/install_gui_deps.sh          # from the repository root (or `make gui`)
#
# rollouts/envs/miniwob.py finds the browser at these Debian paths by default; MINIWOB_CHROME_BINARY and
# MINIWOB_CHROMEDRIVER point it at another Chromium/chromedriver pair of the same major version.
set -euo pipefail

PACKAGES=(chromium chromium-driver fonts-liberation)
APT_CMD="apt-get update && apt-get install -y --no-install-recommends ${PACKAGES[*]}"

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver && -d /usr/share/fonts/truetype/liberation ]]; then
    echo "install_gui_deps: chromium, chromedriver and fonts-liberation present; nothing to do."
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_gui_deps: no apt-get on this host. Install Chromium and a chromedriver of the same major" \
         "version yourself and point MINIWOB_CHROME_BINARY / MINIWOB_CHROMEDRIVER at them." >&2
    exit 1
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install_gui_deps: not root. Run as root (or with sudo):" >&2
    echo "    $APT_CMD" >&2
    exit 1
fi

echo "install_gui_deps: installing ${PACKAGES[*]} with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${PACKAGES[@]}"
/usr/bin/chromium --version 2>/dev/null || true
/usr/bin/chromedriver --version
