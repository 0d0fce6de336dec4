"""Build the compiled core: vhu._mem and vhu._ring.

VHU_DEBUG=1 at build time turns on the C assertions in vhu_barriers.h and
Cython's bounds and wraparound checks.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("VHU_DEBUG", "") not in ("", "0")

macros = [("VHU_DEBUG", "1")] if DEBUG else [("NDEBUG", "1")]
cflags = ["-O0", "-g"] if DEBUG else ["-O3"]
directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}


def ext(module):
    path = module.replace(".", "/") + ".pyx"
    return Extension(module, [path], include_dirs=["vhu", "vhu/workers"],
                     define_macros=macros, extra_compile_args=cflags)


setup(
    ext_modules=cythonize([ext("vhu._mem"), ext("vhu._ring"), ext("vhu.workers._engine"),
                           ext("vhu.workers._guard"), ext("vhu.workers._offload"), ext("vhu.frontend._traffic")], compiler_directives=directives,
                          compile_time_env={"VHU_DEBUG": DEBUG}),
)
