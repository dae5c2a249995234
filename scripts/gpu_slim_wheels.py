#!/usr/bin/env python3
"""Make the wheels for scripts/gpu_unsloth_check.sh fit in one device call (64 MiB carried in all).

    python3 scripts/gpu_slim_wheels.py SRC_DIR DST_DIR

Copies every wheel of SRC_DIR (and SRC_DIR/opt) to DST_DIR, except two that it rewrites smaller, with a
RECORD that lists what is left: bitsandbytes keeps only its CPU and CUDA 13.0 libraries (the device's torch is
cu130; the wheel carries one library per CUDA and ROCm release, 43 MB), unsloth leaves out `studio/` (its web
UI, 26 MB; `unsloth` never imports it).
"""

import base64
import hashlib
import os
import shutil
import sys
import zipfile

DROP = {
    "bitsandbytes": lambda n: n.startswith("bitsandbytes/libbitsandbytes_")
    and not n.endswith(("_cpu.so", "_cuda130.so")),
    "unsloth": lambda n: n.startswith("studio/"),
}


def slim(src, dst, drop):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in zin.namelist():
            if name == record or drop(name):
                continue
            data = zin.read(name)
            zout.writestr(zin.getinfo(name), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        zout.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")


def main(src, dst):
    for sub in ("", "opt"):
        if not os.path.isdir(os.path.join(src, sub)):
            continue
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(src, sub))):
            if not name.endswith(".whl"):
                continue
            a, b = os.path.join(src, sub, name), os.path.join(dst, sub, name)
            drop = DROP.get(name.split("-")[0])
            slim(a, b, drop) if drop else shutil.copy2(a, b)
            print(f"{os.path.join(sub, name)}: {os.path.getsize(a) >> 10} -> {os.path.getsize(b) >> 10} KiB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
