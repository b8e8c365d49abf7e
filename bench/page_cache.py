"""How much of torch's and CUDA's libraries the page cache holds (mincore), and a way to empty it.

bench/first_job.py asks it before and after its run: on a fresh machine those libraries are on disk
only, and whichever job first uses a kernel reads its pages (reading them all ahead, `first_job.py
--page-in`, did not make the first jobs faster: docs/BENCHMARKS.md). `drop` empties the page cache
(root only) and reads back what a fresh machine has in memory anyway: what was just installed or
written (the carried bundle, the benchmark's model), so that only the image's own files are cold.

    python3 bench/page_cache.py            # resident / total of the libraries
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
PAGE = mmap.PAGESIZE
MAP_FAILED = ctypes.c_void_p(-1).value


def library_files() -> list[Path]:
    """torch's shared libraries and those of the nvidia-* wheels it loads, found without importing torch
    (an import would map, and read, some of them)."""
    roots = []
    torch = importlib.util.find_spec("torch")
    if torch is not None and torch.origin:
        roots.append(Path(torch.origin).parent / "lib")
    nvidia = importlib.util.find_spec("nvidia")
    if nvidia is not None:
        roots += [Path(p) for p in nvidia.submodule_search_locations or []]
    return sorted({p for root in roots for p in root.rglob("*.so*") if p.is_file()})


def resident_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the file in the page cache, its size)."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            return 0, size
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return 0, size
            return sum(v & 1 for v in vec) * PAGE, size
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def residency(files: list[Path] | None = None, top: int = 8) -> dict:
    """GB resident of GB in all, and the largest files with their share in memory."""
    rows = [(str(p), *resident_bytes(p)) for p in (files if files is not None else library_files())]
    biggest = sorted(rows, key=lambda r: -r[2])[:top]
    return {"files": len(rows), "total_gb": sum(r[2] for r in rows) / 1e9, "resident_gb": sum(r[1] for r in rows) / 1e9,
            "largest": [(os.path.basename(p), round(size / 1e6), round(res / size, 3) if size else None)
                        for p, res, size in biggest]}


def read_whole(path: Path) -> None:
    """Read a file to its end: its pages are then in the page cache. Unreadable: left as it is."""
    try:
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass
    except OSError:
        pass


def drop(keep_warm: list[Path]) -> bool:
    """Empty the page cache (root only; False where not allowed), then read back `keep_warm` (files or
    directories): what a fresh machine has in memory because it was just written there."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    for root in keep_warm:
        for path in ([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                read_whole(path)
    return True


if __name__ == "__main__":
    json.dump(residency(), sys.stdout, indent=1)
    print()
