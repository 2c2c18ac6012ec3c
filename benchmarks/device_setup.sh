# Sourced at the start of a device call (benchmarks/README.md, "On the device"): the
# carried wheels (.whl/) on PYTHONPATH, dwc installed editable, unbuffered output.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || return 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
export PYTHONUNBUFFERED=1
