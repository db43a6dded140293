"""Build steps that pyproject.toml cannot express: gRPC stubs and the native copy engine.

Stubs are generated from proto/kvstore.proto into kvstore/_proto/ on every build
(regular or editable), never edited by hand.
"""

from __future__ import annotations

import pathlib
import re

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

ROOT = pathlib.Path(__file__).resolve().parent
OUT = ROOT / "kvstore" / "_proto"


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc  # build requirement

    OUT.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        str(ROOT / "proto" / "kvstore.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/kvstore.proto")
    messages_file = OUT / "kvstore_pb2.py"
    # Messages must know their real module, or pickling them (e.g. across spawn) fails.
    messages_file.write_text(
        messages_file.read_text().replace(
            "(DESCRIPTOR, 'kvstore_pb2', _globals)", "(DESCRIPTOR, 'kvstore._proto.kvstore_pb2', _globals)"
        )
    )
    grpc_file = OUT / "kvstore_pb2_grpc.py"
    # protoc emits a top-level import; the stubs live inside the package.
    text = re.sub(
        r"^import kvstore_pb2 as", "from . import kvstore_pb2 as", grpc_file.read_text(), flags=re.M
    )
    grpc_file.write_text(text)
    (OUT / "__init__.py").write_text('"""Generated gRPC stubs (from proto/kvstore.proto by setup.py)."""\n')


class BuildPy(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()
        # The GPU kernels (native/gpu_kernels.cu) ship inside the package: NVRTC compiles them at first use.
        target = pathlib.Path(self.build_lib) / "kvstore" / "gpu" / "gpu_kernels.cu"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((ROOT / "native" / "gpu_kernels.cu").read_text())


class EggInfo(egg_info):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(
    cmdclass={"build_py": BuildPy, "egg_info": EggInfo},
    ext_modules=[
        Extension(
            "kvstore._native",
            sources=["native/copyengine.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
            libraries=["pthread"],
        )
    ],
)
