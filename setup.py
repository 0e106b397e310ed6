"""The one compiled part: the int8 and int4 codecs' per-element loops (``shared/protocol/codecs/_blockwise.c``).

Everything else is declared in pyproject.toml. The extension is optional: where it does not build (no C
compiler), the install goes on and the codecs run their numpy and torch path, which gives the same bits.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension(
        "shared.protocol.codecs._blockwise",
        ["shared/protocol/codecs/_blockwise.c"],
        # -ffp-contract=off: no fused multiply-adds, so the arithmetic rounds as the Python path's does
        extra_compile_args=["-O3", "-ffp-contract=off"],
        optional=True,
    ),
])
