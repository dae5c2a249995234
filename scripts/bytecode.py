#!/usr/bin/env python3
"""Compile an environment's bytecode, sharing what other environments already compiled.

    python scripts/bytecode.py [SITE_PACKAGES [DONOR_SITE_PACKAGES ...]]

SITE_PACKAGES: by default the running interpreter's own (noxfile.py runs it with the environment's Python).

uv installs every environment from its cache by hard links, so the torch stack's sources in .venv and in
each .nox environment are the same files (one inode). Compiling them (what uv's UV_COMPILE_BYTECODE does)
took about 18 s of a session's setup, for the same torch, sympy, pandas, numpy and often transformers in
each. Here each source whose file is the same inode as a donor's, and whose .pyc the donor has, gets the
donor's .pyc by hard link (valid by construction: the .pyc records the source's mtime and size, which a
shared inode shares; Python fixes the code objects' file names on import). The rest is compiled: each
file without a .pyc (without donors: every file). Standard library only: it runs
in the environment's own interpreter (noxfile.py, stage install).
"""

from __future__ import annotations

import compileall
import glob
import os
import sys
import sysconfig
import time

TAG = sys.implementation.cache_tag


def donors_beside(site: str, root: str) -> list:
    """The other environments' site-packages of this Python under `root` (.venv, .nox/*)."""
    tail = os.path.join("lib", os.path.basename(os.path.dirname(site)), "site-packages")
    found = [os.path.join(root, ".venv", tail), *sorted(glob.glob(os.path.join(root, ".nox", "*", tail)))]
    return [d for d in found if os.path.isdir(d) and not os.path.samefile(d, site)]


def share(site: str, donors: list) -> int:
    """Hard-link the donors' .pyc of every source of `site` that is the same file as the donor's."""
    linked = 0
    for info in os.listdir(site):
        record = os.path.join(site, info, "RECORD")
        if not info.endswith(".dist-info") or not os.path.exists(record):
            continue
        have = [d for d in donors if os.path.exists(os.path.join(d, info, "RECORD"))]  # same name and version
        if not have:
            continue
        with open(record, encoding="utf-8") as fh:
            paths = [line.rsplit(",", 2)[0] for line in fh]
        for path in paths:
            if not path.endswith(".py") or path.startswith(".."):
                continue
            head, name = os.path.split(path)
            pyc = os.path.join(head, "__pycache__", f"{name[:-3]}.{TAG}.pyc")
            try:
                inode = os.stat(os.path.join(site, path)).st_ino
            except OSError:
                continue
            for donor in have:
                try:
                    if os.stat(os.path.join(donor, path)).st_ino != inode:
                        continue
                    os.makedirs(os.path.join(site, head, "__pycache__"), exist_ok=True)
                    os.link(os.path.join(donor, pyc), os.path.join(site, pyc))
                    linked += 1
                    break
                except FileExistsError:
                    break
                except OSError:
                    continue
    return linked


def uncompiled(site: str) -> list:
    """The .py files under `site` without a .pyc of this Python beside them (one walk, no reading)."""
    out = []
    for folder, dirs, files in os.walk(site):
        if "__pycache__" in dirs:
            dirs.remove("__pycache__")
            have = set(os.listdir(os.path.join(folder, "__pycache__")))
        else:
            have = set()
        out += [os.path.join(folder, f) for f in files if f.endswith(".py") and f"{f[:-3]}.{TAG}.pyc" not in have]
    return out


def compile_all(paths: list) -> int:
    """Compile `paths`: in worker processes where there are many. Files that do not compile (py2-only
    files some wheels ship) are left, as uv does. compileall.compile_dir would also check every .pyc
    linked above for staleness, one file at a time through its process pool: 4.5 s for an environment
    that had 42 files to compile."""
    if len(paths) < 500:
        return sum(bool(compileall.compile_file(p, quiet=2)) for p in paths)
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor() as pool:
        return sum(bool(ok) for ok in pool.map(partial(compileall.compile_file, quiet=2), paths, chunksize=64))


def main(argv: list) -> int:
    site = os.path.abspath(argv[0] if argv else sysconfig.get_paths()["purelib"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    donors = [os.path.abspath(d) for d in argv[1:]] or donors_beside(site, root)
    start = time.time()
    linked = share(site, donors)
    compiled = compile_all(uncompiled(site))
    print(f"bytecode: {linked} .pyc linked from {len(donors)} other environment(s), {compiled} compiled, "
          f"{time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
