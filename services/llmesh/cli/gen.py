"""`make gen`: compile proto/ into gen/ (Python modules, .pyi stubs, gRPC stubs, descriptor set).

The output depends only on the .proto files and the pinned grpcio-tools version, so running it
on a clean checkout changes nothing (CI checks this with `git diff --exit-code gen/`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

# The descriptor set Envoy's gRPC-JSON transcoder loads (all protos, imports included).
DESCRIPTOR_NAME = "llmesh_descriptor.pb"


def _include_dirs() -> list[Path]:
    """Where the well-known types and google/api/*.proto live (grpcio-tools, googleapis-common-protos)."""
    import google.api  # googleapis-common-protos ships its .proto sources next to the modules

    grpc_tools_protos = Path(str(resources.files("grpc_tools") / "_proto"))
    googleapis_root = Path(next(iter(google.api.__path__))).parent.parent
    return [grpc_tools_protos, googleapis_root]


def generate(proto_root: Path, out: Path) -> list[Path]:
    """Regenerate `out` from every .proto under `proto_root`; returns the compiled files."""
    from grpc_tools import protoc

    protos = sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    generated = out / "llmesh"
    if generated.exists():
        shutil.rmtree(generated)  # stale modules of removed protos must not survive
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        *[f"-I{d}" for d in _include_dirs()],
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--descriptor_set_out={generated / DESCRIPTOR_NAME}",
        "--include_imports",
        *[str(p) for p in protos],
    ]
    generated.mkdir(parents=True, exist_ok=True)
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    return [proto_root / p for p in protos]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmesh gen", description=__doc__)
    parser.add_argument("--proto-root", type=Path, default=Path("proto"))
    parser.add_argument("--out", type=Path, default=Path("gen"))
    ns = parser.parse_args(argv)
    compiled = generate(ns.proto_root, ns.out)
    print(f"generated {len(compiled)} protos into {ns.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
