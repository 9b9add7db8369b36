#!/usr/bin/env bash
# Set up and run tunnelkit's whole test suite on a fresh Debian machine (run as root for apt-get,
# or with the Debian packages below already installed).  Type-checks (mypy), then runs the tests;
# ends with "N passed, N failed" (a failed type check counts as one failed test).
# It installs tunnelkit editable, with the test tools, into the checkout's .venv (tools/install.sh).
set -u
cd "$(dirname "$0")/.."

APT_PACKAGES="haproxy socat mosquitto openssh-server openssh-client x11vnc xvfb python3-venv chromium chromium-driver libnss3-tools postgresql"
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

# tunnelkit and the test tools go into the checkout's own .venv (tools/install.sh), never into the
# Python that is active: the tests run there, with .venv/bin first on PATH (aws, tunnelkit).
bash tools/install.sh --dev || { echo "tools/install.sh --dev failed"; exit 1; }
VENV=$(cd "${TUNNELKIT_VENV:-.venv}" && pwd)
export PATH="$VENV/bin:$PATH"
unset PYTHONHOME

# The type check (mypy.ini: mypy with the mypy-zope plugin) before the tests; a failure fails the run.
echo "Type check: mypy (mypy.ini)"
"$VENV/bin/python" -m mypy --config-file mypy.ini
mypy_status=$?

log=$(mktemp)
"$VENV/bin/python" -m twisted.trial --jobs 2 --temp-directory "${TMPDIR:-/tmp}/tunnelkit-trial-$$" tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
"$VENV/bin/python" tools/trial_summary.py "$log" $([ "$mypy_status" = 0 ] || echo --type-check-failed)
summary_status=$?
rm -f "$log"
rm -rf "${TMPDIR:-/tmp}/tunnelkit-trial-$$"
[ "$status" = 0 ] && [ "$summary_status" = 0 ] && [ "$mypy_status" = 0 ] && exit 0
exit 1
