"""Build of the optional ``fastes._C`` extension; package metadata lives in pyproject.toml.

C++ sources (csrc/*.cpp) are always compiled; CUDA sources (csrc/*.cu) only when the installed
torch has CUDA and nvcc is found. ``FASTES_DISABLE_EXTENSION=1`` installs the pure-Python
package (fastes then runs on torch, with one warning). Install with
``pip install -e . --no-build-isolation`` so that the build sees the installed torch.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")

# Host flags. -O3 and portable code only: wider ISAs are picked at run time inside the kernels.
# -ffp-contract=off keeps float results identical across ISAs (no FMA fusion); -fno-math-errno
# only lets sqrtf vectorize and changes no value.
# -g0 drops the debug info Python's CFLAGS ask for: ~11 MB of it for the torch headers alone
# (FASTES_DEBUG=1 keeps it).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
NVCC_FLAGS = ["-O3"]
LINK_FLAGS = ["-fopenmp"]
if os.environ.get("FASTES_DEBUG") != "1":
    CXX_FLAGS.append("-g0")


def _log(message: str) -> None:
    print(f"fastes setup: {message}", file=sys.stderr)


def _want_extension() -> bool:
    return os.environ.get("FASTES_DISABLE_EXTENSION") != "1"


def _cuda_build_possible(cpp_extension: object) -> bool:
    """CUDA sources are built only with a CUDA torch and an nvcc to compile them."""
    import torch

    if os.environ.get("FASTES_DISABLE_CUDA") == "1":
        return False
    if torch.version.cuda is None:
        return False
    home = getattr(cpp_extension, "CUDA_HOME", None)
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc"))


def _extensions() -> tuple[list, dict]:
    if not _want_extension():
        _log("FASTES_DISABLE_EXTENSION=1: building without fastes._C")
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable (use --no-build-isolation): building without fastes._C")
        return [], {}

    # Ninja compiles sources in parallel; one job per core, at most 4 (each nvcc job is memory hungry).
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))

    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    rel = [os.path.relpath(p, ROOT) for p in cpp_sources]
    common = {"include_dirs": [CSRC], "extra_link_args": LINK_FLAGS}

    if _cuda_build_possible(cpp_extension):
        _log(f"building fastes._C with CUDA {__import__('torch').version.cuda}")
        ext = cpp_extension.CUDAExtension(
            name="fastes._C",
            sources=rel + [os.path.relpath(p, ROOT) for p in cu_sources],
            define_macros=[("FASTES_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            **common,
        )
    else:
        _log("building fastes._C for CPU only (no CUDA torch or no nvcc)")
        ext = cpp_extension.CppExtension(
            name="fastes._C",
            sources=rel,
            extra_compile_args={"cxx": CXX_FLAGS},
            **common,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
