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
# vpcd listens on 35963 and 35964 (slots 0 and 1), inside Linux's ephemeral port range: a
# connection given one of them as its own port keeps vpcd from listening there, and the
# PC/SC tests cannot run. Reserved, no connection is given them.
vpcd_ports=35963-35964
reserved=/proc/sys/net/ipv4/ip_local_reserved_ports
if [ -r "$reserved" ] && ! grep -q "$vpcd_ports" "$reserved"; then
  if [ "$(id -u)" -eq 0 ] && [ -w "$reserved" ]; then
    current=$(cat "$reserved")
    echo "${current:+$current,}$vpcd_ports" > "$reserved"
  else
    echo "Recommended (keeps connections off vpcd's ports):" >&2
    echo "  sudo sysctl -w net.ipv4.ip_local_reserved_ports=$vpcd_ports" >&2
  fi
fi

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
