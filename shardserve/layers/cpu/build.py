"""Builds the kernel sources (kernels.c, attention.c, common.h) into one shared library at first use and loads it with ctypes.

The library is compiled for this machine (`gcc -O3 -march=native -fopenmp`) and cached under
$SHARDSERVE_CACHE_DIR (default ~/.cache/shardserve)/cpu_kernels/, keyed by the source, the compiler, the flags and
the CPU's feature flags, so a cache shared between different machines never loads code built for another CPU.
Concurrent builders (the ranks of one server) take a file lock; the library is written to a temporary name and
renamed into place. When no compiler is found or the build fails, `load()` returns None with the reason in
`unavailable_reason()`, and the layers use their torch ops."""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / "kernels.c", HERE / "attention.c"]
HEADERS = [HERE / "common.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-fno-math-errno"]
ABI_VERSION = 2  # must match ss_abi_version() in kernels.c

_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
RETURNS_COUNT = ("ss_rotary", "ss_paged_attention", "ss_attn_block", "ss_mlp_block", "ss_decode_stack")  # these return how many inputs were out of range
SIGNATURES = {  # every exported kernel with its argument types (pointers are data_ptr() integers)
    "ss_linear": [_INT, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _INT],
    "ss_linear_f32out": [_INT, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _INT],
    "ss_rms_norm": [_INT, _P, _I64, _P, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _F, _INT],
    "ss_silu_and_mul": [_INT, _P, _I64, _P, _I64, _I64, _I64, _INT],
    "ss_rotary": [_INT, _P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _INT],
    "ss_write_kv": [_INT, _P, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64],
    "ss_paged_attention": [_INT, _P, _I64, _I64, _P, _P, _I64, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _I64, _I64,
                           _I64, _F, _I64, _F, _P, _INT],
    "ss_attn_block": [_P, _INT, _P, _P, _INT, _P, _P, _I64, _I64, _P, _P, _P, _I64, _P, _I64, _INT],
    "ss_mlp_block": [_P, _INT, _P, _P, _P, _I64, _INT],
    "ss_decode_stack": [_I64, _P, _P, _P, _INT, _P, _P, _INT, _I64, _I64, _P, _P, _P, _I64, _P, _I64, _INT],
}

QUERIES = {"ss_amx_available": [], "ss_linear_max_rows": [_INT, _I64], "ss_has_avx512": []}  # these return an int

_reason: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("SHARDSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "shardserve")
    return Path(root) / "cpu_kernels"


def cpu_features(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo's `flags` (x86) or `Features` (Arm) line, or `cpuinfo` given."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "gcc"
    return shutil.which(cc) or shutil.which("cc")


def _key(cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    h = hashlib.sha256()
    cpu = " ".join(sorted(cpu_features())) or os.uname().machine
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(FLAGS).encode(), version.encode(), cpu.encode(),
                 str(ABI_VERSION).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # another process built it while this one waited
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    if lib.ss_abi_version() != ABI_VERSION:
        raise RuntimeError(f"kernel library ABI {lib.ss_abi_version()} != {ABI_VERSION}")
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, (_I64 if name in RETURNS_COUNT else None)
    for name, args in QUERIES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _INT
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, building it first if needed; None (and a logged reason) if it cannot be."""
    global _reason
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler (gcc) on PATH; install gcc or set CC"
    else:
        try:
            torch.get_num_threads()  # torch's OpenMP runtime is loaded first, so the library shares it
            target = cache_dir() / f"kernels-{_key(cc)}.so"
            if not target.exists():
                _build(cc, target)
            return _bind(ctypes.CDLL(str(target)))
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
            _reason = f"{type(e).__name__}: {e}"
    logger.warning("CPU decode kernels unavailable (%s); using torch ops, which are slower on CPU", _reason)
    return None


def unavailable_reason() -> str | None:
    return _reason
