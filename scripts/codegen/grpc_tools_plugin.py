"""A protoc plugin that runs one of grpc_tools' built-in generators, so buf can drive them.

buf.gen.yaml runs it once per generator, as a local plugin:

    local: [".venv/bin/python", "scripts/codegen/grpc_tools_plugin.py", "python"]

with ``python`` (``*_pb2.py``), ``pyi`` (``*_pb2.pyi``) or ``grpc_python``
(``*_pb2_grpc.py``). The Python generators live inside protoc (and grpc's inside
grpc_tools' protoc), not in plugins buf could call: this plugin reads buf's
CodeGeneratorRequest from stdin, hands its files to ``grpc_tools.protoc`` as a
descriptor set (``--descriptor_set_in``), and answers with what that wrote.

The output is byte for byte what ``python -m grpc_tools.protoc -Iprotos --python_out=...``
writes from the .proto files: the pinned grpcio-tools does the generating either way.
One difference is removed first: buf's compiler records every field's ``json_name``,
protoc only those a .proto spells out, and ``*_pb2.py`` embeds the descriptor; a
``json_name`` equal to the default (lowerCamelCase of the field name) is dropped, as
protoc's own parser would have left it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc

GENERATORS = ("python", "pyi", "grpc_python")


def default_json_name(name: str) -> str:
    """protoc's ``ToJsonName``: drop underscores, capitalising the letter after each."""
    out: list[str] = []
    upper_next = False
    for char in name:
        if char == "_":
            upper_next = True
        elif upper_next:
            out.append(char.upper())
            upper_next = False
        else:
            out.append(char)
    return "".join(out)


def _strip_default_json_names(messages) -> None:  # type: ignore[no-untyped-def]
    for message in messages:
        for field in list(message.field) + list(message.extension):
            if field.HasField("json_name") and field.json_name == default_json_name(field.name):
                field.ClearField("json_name")
        _strip_default_json_names(message.nested_type)


def as_protoc_parsed(files: list[descriptor_pb2.FileDescriptorProto]) -> descriptor_pb2.FileDescriptorSet:
    """The files as protoc's parser would have described them (see the module docstring)."""
    result = descriptor_pb2.FileDescriptorSet()
    for file in files:
        copy = result.file.add()
        copy.CopyFrom(file)
        _strip_default_json_names(copy.message_type)
        for field in copy.extension:
            if field.HasField("json_name") and field.json_name == default_json_name(field.name):
                field.ClearField("json_name")
    return result


def generate(generator: str, request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory(prefix="agentd-codegen-") as tmp:
        descriptors = Path(tmp, "input.binpb")
        descriptors.write_bytes(as_protoc_parsed(list(request.proto_file)).SerializeToString())
        out = Path(tmp, "out")
        out.mkdir()
        target = f"{request.parameter}:{out}" if request.parameter else str(out)
        args = ["grpc_tools.protoc", f"--descriptor_set_in={descriptors}", f"--{generator}_out={target}",
                *request.file_to_generate]
        code = protoc.main(args)
        if code != 0:
            response.error = f"grpc_tools.protoc --{generator}_out failed (exit {code}); see its messages above"
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=path.relative_to(out).as_posix(), content=path.read_text(encoding="utf-8"))
    return response


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in GENERATORS:
        print(f"usage: {os.path.basename(argv[0])} {{{','.join(GENERATORS)}}} < CodeGeneratorRequest",
              file=sys.stderr)
        return 2
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    # protoc prints its own diagnostics to stderr; stdout carries only the response.
    sys.stdout.buffer.write(generate(argv[1], request).SerializeToString())
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
