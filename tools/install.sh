#!/usr/bin/env bash
# Install tunnelkit into the checkout's own virtual environment, .venv, made from the machine's Python
# (Debian's and Ubuntu's system Python refuse `pip install` outside one: PEP 668).  Every other Python
# environment is left alone.  Run it again at any time: it reuses .venv and reinstalls tunnelkit.
#
#   bash tools/install.sh          tunnelkit with everything (service, CLI, local proxy, agent)
#   bash tools/install.sh --device only what the local proxy and the agent need
#   bash tools/install.sh --dev    editable (the checkout's code runs) with the test tools
#
# Then run .venv/bin/twistd, .venv/bin/tunnelkit, ... or `. .venv/bin/activate` first.
# PYTHON chooses the interpreter (default: python3 on PATH); TUNNELKIT_VENV the directory (default .venv).
# As root it apt-installs python3-venv when the interpreter cannot make a virtual environment.
set -u
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") spec=".[service]" ;;
  --device) spec="." ;;
  --dev) spec="-e .[service,test]" ;;
  *) echo "usage: bash tools/install.sh [--device|--dev]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
VENV=${TUNNELKIT_VENV:-.venv}

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tools/install.sh: installing Debian packages: $*"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >/dev/null \
      || { echo "tools/install.sh: apt-get install $* failed" >&2; exit 1; }
  else
    echo "tools/install.sh: $1: install it first (as root: apt-get install $*)" >&2
    exit 1
  fi
}

if ! command -v "$PYTHON" >/dev/null; then
  [ "$PYTHON" = python3 ] || { echo "tools/install.sh: PYTHON=$PYTHON: no such command" >&2; exit 1; }
  apt_install python3 python3-venv
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "tools/install.sh: tunnelkit needs Python 3.10 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }

# Reuse a working .venv; make a new one otherwise (a missing or broken one, e.g. its Python removed).
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$VENV"
  if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) separately.
    rm -rf "$VENV"
    version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    apt_install python3-venv "python$version-venv"
    "$PYTHON" -m venv "$VENV" || { echo "tools/install.sh: $PYTHON -m venv $VENV failed" >&2; exit 1; }
  fi
  echo "tools/install.sh: made the virtual environment $VENV with $("$VENV/bin/python" -V)"
fi

# The web console's terminal (service installs): xterm.js and its fit add-on from npm, the versions
# tunnelkit/service/console/vendor/package-lock.json names; installed before pip, which copies them.
# Optional: without npm (an offline host, say) the service installs and runs, and the console's
# terminal page says the packages are missing; --console-assets DIR can point to them later.
if [ "$spec" != "." ]; then
  if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_install npm
  fi
  if ! command -v npm >/dev/null; then
    echo "tools/install.sh: warning: npm is not installed: the web console's terminal (SSH in the browser) will be unavailable; install npm and run this again" >&2
  elif ! npm ci --prefix tunnelkit/service/console/vendor --no-audit --no-fund >/dev/null; then
    echo "tools/install.sh: warning: npm ci --prefix tunnelkit/service/console/vendor failed: the web console's terminal will be unavailable; run this again when the npm registry is reachable" >&2
  fi
fi

case "$spec" in
  "-e "*) pip_args=(-e "${spec#-e }") ;;
  *) pip_args=("$spec") ;;
esac
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${pip_args[@]}" \
  || { echo "tools/install.sh: pip install $spec into $VENV failed" >&2; exit 1; }
echo "tools/install.sh: tunnelkit is installed in $VENV: run $VENV/bin/twistd, $VENV/bin/tunnelkit (or . $VENV/bin/activate)"
