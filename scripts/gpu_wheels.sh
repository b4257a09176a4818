#!/usr/bin/env bash
# scripts/gpu_wheels.sh DIR: on a CPU machine with pip and network, the exact cp312 manylinux wheels that stage B of
# scripts/gpu_check.py needs beyond what the lent GPU machine already has (Python 3.12, torch 2.11+cu130, numpy,
# packaging, six, wheel, pyyaml, typing-extensions), packed into parts of <= PART_MIB MiB (one per device call) with
# DIR/manifest.json: each part's size and sha256, each wheel's, and the ONE install command. Nothing is installed here.
#
# Stage B imports nvidia.dali (CUDA 13 build, as the lent driver is) and its dependencies; `ingest synth` and
# build-shards need neither pydicom nor webdataset, so neither is carried. DALI's wheel ships its Python bindings
# for every CPython from 3.10 to 3.15; the repack keeps the 3.12 ones only (pip does not check RECORD hashes).
set -euo pipefail

DIR=${1:?usage: scripts/gpu_wheels.sh DIR   (then carry DIR/cxr-wheels.tar.part-NN, one per device call)}
PART_MIB=${PART_MIB:-60}
PY=${PYTHON:-python3}
PINS=(
    nvidia-dali-cuda130==2.4.0
    nvidia-nvimgcodec-cu13==0.9.0.20
    nvidia-libnvcomp-cu13==5.3.0.16
    nvidia-nvjpeg==13.3.2.43
    nvidia-nvjpeg2k-cu13==0.11.0.51
    nvidia-nvtiff-cu13==0.8.0.82
    nvtx==0.2.17
    libcst==1.9.0
    optree==0.20.0
    astunparse==1.6.3
    gast==0.7.0
    makefun==1.16.0
)
# what gpu_check.py's install step runs on the lent machine, after it checked and unpacked the parts
INSTALL="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/cxr-site \
/tmp/cxr-wheels/*.whl"

mkdir -p "$DIR"
DL=$(mktemp -d "${TMPDIR:-/tmp}/cxr-wheels.XXXXXX")
trap 'rm -rf "$DL"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DL/whl" "${PINS[@]}"
count=$(ls "$DL"/whl/*.whl | wc -l)
if [ "$count" -ne "${#PINS[@]}" ]; then
    echo "gpu_wheels: expected ${#PINS[@]} wheels, pip saved $count (one version of each pin)" >&2
    exit 1
fi

# cp312-only DALI, and one tar of every wheel split into parts, described by the manifest
"$PY" - "$DL" "$DIR" "$PART_MIB" "$INSTALL" "${PINS[@]}" <<'EOF'
import hashlib, json, os, sys, tarfile, zipfile
from pathlib import Path

dl, out, part_mib, install, pins = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()

def cp312_only(wheel: Path) -> Path:
    """The same wheel without the CPython extension modules of other Python versions (RECORD rewritten)."""
    keep = lambda n: ".cpython-" not in n or ".cpython-312-" in n
    slim = wheel.with_name(wheel.name + ".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if not keep(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(l for l in data.decode().splitlines(True) if keep(l.split(",")[0])).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    before = wheel.stat().st_size
    os.replace(slim, wheel)
    print(f"repacked {wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB (cp312 only)")
    return wheel

wheels = sorted((dl / "whl").glob("*.whl"))
for w in wheels:
    if w.name.startswith("nvidia_dali_cuda"):
        cp312_only(w)
bundle = dl / "cxr-wheels.tar"
with tarfile.open(bundle, "w") as tf:  # wheels are zip-compressed already: a plain tar
    for w in wheels:
        tf.add(w, arcname=w.name)
for old in out.glob("cxr-wheels.tar.part-*"):
    old.unlink()
parts, limit = [], part_mib * 2**20
with open(bundle, "rb") as f:
    while chunk := f.read(limit):
        path = out / f"cxr-wheels.tar.part-{len(parts) + 1:02d}"
        path.write_bytes(chunk)
        parts.append({"name": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
manifest = {
    "format": "cxr-ssl-gpu-wheels/1", "python": "cp312", "platform": "manylinux x86_64", "pins": pins,
    "wheels": [{"name": w.name, "bytes": w.stat().st_size, "sha256": sha256(w)} for w in wheels],
    "parts": parts, "bundle_sha256": sha256(bundle),
    "unpack": "mkdir -p /tmp/cxr-wheels && cat cxr-wheels.tar.part-* | tar -x -C /tmp/cxr-wheels",
    "install": install,
}
tmp = out / "manifest.json.tmp"
tmp.write_text(json.dumps(manifest, indent=2) + "\n")
os.replace(tmp, out / "manifest.json")
for p in parts:
    print(f"{p['name']}  {p['bytes'] / 2**20:6.1f} MiB  {p['sha256']}")
print(f"{len(wheels)} wheels, {sum(p['bytes'] for p in parts) / 2**20:.1f} MiB in {len(parts)} parts; "
      f"manifest {out / 'manifest.json'}")
EOF

# the parts put back together give the same tar, holding every wheel
cat "$DIR"/cxr-wheels.tar.part-* | tar -t | sort > "$DL/listed"
"$PY" -c "import json,sys; print('\n'.join(sorted(w['name'] for w in json.load(open(sys.argv[1]))['wheels'])))" \
    "$DIR/manifest.json" > "$DL/expected"
if ! cmp -s "$DL/listed" "$DL/expected"; then
    echo "gpu_wheels: the reassembled parts do not hold the manifest's wheels" >&2
    exit 1
fi
echo "install on the lent machine: $INSTALL"
