# Source at the start of a device command (see docs/BENCHMARKS.md):
#   source bench/device_env.sh
# Installs the carried .device bundle (Ray, GPTQModel, ...) into /tmp/site and puts qrun on the path.
# Does what .device/install.sh does, except that pypcre's build (~1 min) is skipped where a wheel of
# it lies in .device/whl: the first call builds one and leaves a copy in $OUT/wheels to carry next time.
set -e
mkdir -p /tmp/site /tmp/wheels
built=""  # pypcre's wheel, where the carried bundle has none (a machine kept warm has it from the last call)
if ! ls .device/whl/pypcre-*.whl >/dev/null 2>&1; then
    ls /tmp/wheels/pypcre-*.whl >/dev/null 2>&1 ||
        python3 -m pip wheel -q --no-index --no-deps --no-build-isolation -w /tmp/wheels .device/pypcre-*.tar.gz
    [ -n "$OUT" ] && mkdir -p "$OUT/wheels" && cp /tmp/wheels/pypcre-*.whl "$OUT/wheels/"
    built=$(ls /tmp/wheels/pypcre-*.whl)
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl $built
tar xJf .device/ray-trimmed.tar.xz -C /tmp/site
# The bundle's tar drops the executable bit of Ray's own binaries (gcs_server, raylet, ...).
find /tmp/site/ray -type f ! -name '*.*' -exec chmod +x {} +
# qrun is not installed there: qrun/__init__.py then finds its role folders (qrun.db = db/, ...) in the checkout.
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
set +e
