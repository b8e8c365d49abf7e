# Source at the start of a device command (see docs/BENCHMARKS.md):
#   source bench/device_env.sh
# Installs the carried .device bundle (Ray, GPTQModel, ...) into /tmp/site and puts qrun on the path.
set -e
bash .device/install.sh
# The bundle's tar drops the executable bit of Ray's own binaries (gcs_server, raylet, ...).
find /tmp/site/ray -type f ! -name '*.*' -exec chmod +x {} +
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
set +e
