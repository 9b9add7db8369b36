#!/usr/bin/env bash
# Set up and run tunnelkit's whole test suite on a fresh Debian machine (run as root for apt-get,
# or with the Debian packages below already installed).  Ends with "N passed, N failed".
set -u
cd "$(dirname "$0")/.."

APT_PACKAGES="mosquitto openssh-server openssh-client x11vnc xvfb chromium chromium-driver libnss3-tools"
# The web console's terminal code comes from npm (tunnelkit/service/console/vendor/package.json).
command -v npm >/dev/null 2>&1 || APT_PACKAGES="$APT_PACKAGES npm"
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "Installing Debian packages:$missing"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null \
      || { echo "apt-get install failed for:$missing"; exit 1; }
  else
    echo "Missing Debian packages (install them as root):$missing"; exit 1
  fi
fi
# The service's sshd end-to-end tests run sshd directly; it wants this directory.
[ -d /run/sshd ] || mkdir -p /run/sshd 2>/dev/null || true

# The web console's terminal: xterm.js and its fit add-on, the versions package-lock.json names.
npm ci --prefix tunnelkit/service/console/vendor --no-audit --no-fund >/dev/null \
  || { echo "npm ci --prefix tunnelkit/service/console/vendor failed"; exit 1; }

python3 -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test]' \
  || { echo "pip install failed"; exit 1; }

log=$(mktemp)
python3 -m twisted.trial --jobs 2 --temp-directory "${TMPDIR:-/tmp}/tunnelkit-trial-$$" tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
python3 tools/trial_summary.py "$log"
summary_status=$?
rm -f "$log"
rm -rf "${TMPDIR:-/tmp}/tunnelkit-trial-$$"
[ "$status" = 0 ] && [ "$summary_status" = 0 ] && exit 0
exit 1
