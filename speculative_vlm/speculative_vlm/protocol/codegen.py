"""Regenerates the committed protobuf/gRPC stubs from ``verifier.proto`` with grpcio-tools.

The stubs are committed so the robot needs no code generator; a test regenerates them into
a temporary folder and fails when the committed ones are stale. Run
``speculative-vlm gen-protocol`` after editing the .proto.
"""

from __future__ import annotations

import tempfile
from importlib.resources import files
from pathlib import Path

PROTO_NAME = "verifier.proto"
GENERATED = ("verifier_pb2.py", "verifier_pb2_grpc.py")


def protocol_dir() -> Path:
    return Path(str(files("speculative_vlm.protocol")))


class CodegenFailed(RuntimeError):
    """protoc rejected the .proto; its message says where."""


def generate(out_dir: Path) -> dict[str, bytes]:
    """Generate the stubs into ``out_dir`` and return {file name: contents}."""
    from grpc_tools import protoc  # build-time only: the robot never imports grpcio-tools

    # The include root is the folder above the Python package, so the .proto is known as
    # speculative_vlm/protocol/verifier.proto and the generated imports are absolute.
    root = protocol_dir().parent.parent
    proto = protocol_dir() / PROTO_NAME
    well_known = Path(str(files("grpc_tools"))) / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto.relative_to(root)),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise CodegenFailed(f"protoc exited {rc} on {proto}; fix the .proto and run again")
    generated = out_dir / "speculative_vlm" / "protocol"
    return {name: (generated / name).read_bytes() for name in GENERATED}


def stale_files() -> list[str]:
    """Names of committed stubs that differ from what the .proto generates now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    return [name for name, data in fresh.items()
            if not (protocol_dir() / name).exists() or (protocol_dir() / name).read_bytes() != data]
