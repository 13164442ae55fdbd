"""Build of flamingo_rt: the Python package, the Triton kernels (``kernels/`` installed as
``flamingo_rt.kernels``) and the C++/CUDA extension ``flamingo_rt._C``.

The extension is built against the torch already installed, so install with

    pip install --no-build-isolation -e .        # development (builds _C in place)
    pip install --no-build-isolation .           # a normal install

A plain (isolated) ``pip install .`` has no torch while building: it installs the pure-
Python package without the extension (every op then runs its reference backend) and
prints a warning; ``FLAMINGO_RT_REQUIRE_EXT=1`` makes that an error instead.

CPU sources (``csrc/cpu/*.cpp``, ``csrc/torch/*.cpp``, ``csrc/python/*.cpp``) are always compiled: -O3, OpenMP
on Linux, no -march (the CPU kernels pick AVX-512 / AVX2 / SSE2 at run time). The CUDA
sources (``csrc/cuda/*.cu``) are added when torch is a CUDA build and nvcc is found with
the same CUDA major version. Environment:

    FLAMINGO_RT_CUDA=0|1        force the CUDA kernels off / on (on: fail if impossible)
    FLAMINGO_RT_CUDA_ARCHS=90   ';'-separated SM versions to build SASS for (default 90);
                                PTX of the highest is embedded too, for newer GPUs
    CUDA_HOME                   the CUDA toolkit (default: found from nvcc)
    MAX_JOBS=N                  parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version() -> str:
    with open(os.path.join(ROOT, "flamingo_rt", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    return m.group(1) if m else "0.0.0"


def _env_switch(name: str) -> bool | None:
    v = os.environ.get(name, "").strip().lower()
    if v in ("", "auto"):
        return None
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise SystemExit(f"{name} must be 0 or 1 (or unset for auto), got {v!r}")


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root. nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc
    exec'ing the real one), so ask nvcc itself where it lives before guessing."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
            if m:
                candidates.append(os.path.normpath(m.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return c
    return None


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True, text=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _decide_cuda(torch) -> tuple[bool, str]:
    """(build CUDA?, why). Must run before torch.utils.cpp_extension is imported, since
    that module reads CUDA_HOME once at import."""
    forced = _env_switch("FLAMINGO_RT_CUDA")
    if forced is False:
        return False, "FLAMINGO_RT_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        problems.append("nvcc / the CUDA toolkit was not found (set CUDA_HOME)")
    else:
        os.environ["CUDA_HOME"] = cuda_home
        ver = _nvcc_version(cuda_home)
        if torch.version.cuda and ver and ver.split(".")[0] != torch.version.cuda.split(".")[0]:
            problems.append(f"nvcc is CUDA {ver} but torch was built with CUDA {torch.version.cuda}")
    if problems:
        if forced:
            raise SystemExit("FLAMINGO_RT_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {cuda_home}"


def _cuda_arch_flags() -> list[str]:
    archs = [a.strip().replace(".", "") for a in os.environ.get("FLAMINGO_RT_CUDA_ARCHS", "90").split(";")]
    archs = sorted({a for a in archs if a}, key=lambda a: int(re.sub(r"\D", "", a) or 0))
    if not archs:
        raise SystemExit("FLAMINGO_RT_CUDA_ARCHS is empty")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX
    return flags


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    try:
        import torch
    except ImportError:
        # An isolated build (plain `pip install .`) has no torch: install the pure-Python
        # package, which runs every op on its reference backend, and say so loudly.
        if _env_switch("FLAMINGO_RT_REQUIRE_EXT"):
            raise SystemExit(
                "FLAMINGO_RT_REQUIRE_EXT=1 but torch is not importable here; install torch, then "
                "pip install --no-build-isolation ."
            ) from None
        print(
            "\n*** flamingo_rt: torch is not importable in this build environment (an isolated "
            "build, e.g. plain `pip install .`), so the C++/CUDA extension flamingo_rt._C is NOT "
            "built and every op runs on its plain-torch reference backend. For the kernels: "
            "pip install --no-build-isolation . ***\n",
            file=sys.stderr,
        )
        return [], {}

    with_cuda, why = _decide_cuda(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    linux = sys.platform.startswith("linux")
    # csrc/tokenizer: the plain C++ tokenizer, bound as torch.classes.flamingo_rt_C.Tokenizer;
    # csrc/python: the Python module init (C++ hosts link csrc/torch without it)
    sources = (_rel("csrc/cpu/*.cpp") + _rel("csrc/tokenizer/*.cpp") + _rel("csrc/torch/*.cpp")
               + _rel("csrc/python/*.cpp"))
    cxx = ["-O3", "-Wall", "-Wno-unknown-pragmas"]
    ldflags = []
    if linux:
        # libgomp.so.1: the process reuses the copy torch already loaded (same soname).
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    macros = []
    kwargs = dict(
        name="flamingo_rt._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=ldflags,
    )
    if with_cuda:
        sources += _rel("csrc/cuda/*.cu")
        macros.append(("FLAMINGO_RT_WITH_CUDA", "1"))
        nvcc = ["-O3", "-lineinfo"] + _cuda_arch_flags()
        ext = CUDAExtension(sources=sources, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension(sources=sources, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"flamingo_rt: building _C with{'' if with_cuda else 'out'} CUDA kernels ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _packages() -> tuple[list[str], dict[str, str]]:
    pkgs = find_packages(where=ROOT, include=["flamingo_rt", "flamingo_rt.*"])
    kernels = ["flamingo_rt.kernels"] + [
        "flamingo_rt.kernels." + p for p in find_packages(where=os.path.join(ROOT, "kernels"))
    ]
    return pkgs + kernels, {"flamingo_rt.kernels": "kernels"}


# Commands that only describe the project (metadata, sdist, help) do not need torch.
_INFO_CMDS = {"egg_info", "dist_info", "sdist", "clean", "check",
              "--name", "--version", "--help", "-h", "--help-commands"}
_BUILD_CMDS = {"build", "build_ext", "build_py", "bdist_wheel", "editable_wheel", "develop",
               "install", "bdist_egg", "bdist"}
_args = set(sys.argv[1:])
if _args & _INFO_CMDS and not _args & _BUILD_CMDS:
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = _extensions()

packages, package_dir = _packages()

setup(
    name="flamingo_rt",
    version=_read_version(),
    description="Kernels and runtime for Flamingo-style visual language models",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    # the shipped model (flamingo_rt/assets/tiny-world: weights, config, tokenizer), so that a
    # non-editable install runs the demo too
    package_data={"flamingo_rt": ["assets/*/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch", "numpy", "safetensors", "tokenizers", "tqdm"],
    extras_require={"triton": ["triton"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["flamingo-rt = flamingo_rt.cli:main"]},
    zip_safe=False,
)
