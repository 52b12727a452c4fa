#!/usr/bin/env bash
# Installs what the tests need on a fresh machine, then runs them:
#   - Debian: GStreamer RTSP server (for ../shared/rtsp_test_server.py), gst-launch,
#     Chromium + ChromeDriver (web page test), PostgreSQL + mosquitto (test_integrations starts its own)
#   - PyPI label-studio in tests/.labelstudio (test_propose starts it)
#   - the dishtrack package with its test and fast (onnxruntime, openvino) extras (torch/torchvision pinned; pip takes them from local disk)
# Extra arguments go to pytest. Everything runs, the fault scenarios (-m faults) included; they
# mount small tmpfs filesystems (full / read-only disk), so CI runs this as root.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
      gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-tools chromium chromium-driver
      postgresql mosquitto)
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check '.[test,fast]'
# Label Studio for the propose round trip (test_propose.py), in its own virtual environment: a
# Django application with its own pins, a tool beside the service and not a dependency of it
LS=tests/.labelstudio
if [ -z "${DISHTRACK_LABEL_STUDIO:-}" ] && [ ! -x "$LS/bin/label-studio" ]; then
  echo "installing label-studio into $LS"
  { python3 -m venv "$LS" && "$LS/bin/pip" install -q --disable-pip-version-check 'label-studio==1.23.2'; } \
    || { rm -rf "$LS"; echo "warning: label-studio did not install (python3 -m venv needs ensurepip: Debian" \
         "python3-venv); its test is skipped, or fails with DISHTRACK_REQUIRE_LABEL_STUDIO=1 (.ci/run)" >&2; }
fi
# run from tests/ so the checkout's folders (service/, models/ ...) are never
# mistaken for packages: what is tested is the installed dishtrack
cd tests
exec python3 -m pytest -p no:cacheprovider "$@"
