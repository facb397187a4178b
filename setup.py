"""Build shmreg's optional compiled fast path (everything else is in pyproject.toml).

Without a C compiler the build of ``shmreg._engine._speedups`` fails quietly and shmreg runs
in pure Python (``shmreg info`` says which path is active). ``SHMREG_REQUIRE_SPEEDUPS=1``
makes that failure fatal, as CI sets it; ``SHMREG_PUREPYTHON=1`` skips the build.
"""

import glob
import os

from setuptools import Extension, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


extensions = []
if not _flag("SHMREG_PUREPYTHON"):
    extensions.append(
        Extension(
            "shmreg._engine._speedups",
            ["shmreg/_engine/_speedups.c"],
            depends=["shmreg/_engine/_layout.h", *glob.glob("shmreg/_engine/_speedups_src/*.c.h")],
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE"],
            libraries=["pthread"],
            optional=not _flag("SHMREG_REQUIRE_SPEEDUPS"),
        )
    )

setup(ext_modules=extensions)
