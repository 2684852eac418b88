#!/usr/bin/env bash
# Install the Debian packages the project needs, once: apt-get when root, otherwise print
# the exact command. Fast when everything is present (dpkg only, no apt-get).
set -euo pipefail

packages=(
  pcscd vsmartcard-vpcd libpcsclite-dev   # the PC/SC stack with virtual readers
  pcsc-tools opensc                      # scriptor, opensc-tool: drive the card like testers do
  gcc                                    # pyscard builds from source (no Linux wheel)
  chromium chromium-driver               # the web platform's end-to-end test
  fonts-noto-cjk                         # Chinese pages render as text in screenshots
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ! python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  missing+=("python3-dev")
fi
[ ${#missing[@]} -eq 0 ] && exit 0

command=(apt-get install -y --no-install-recommends "${missing[@]}")
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system packages. Run:" >&2
  echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive ${command[*]}" >&2
  exit 1
fi
echo "Installing: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${command[@]}" >/dev/null
