"""Server reflection that carries the proto's comments.

The descriptors compiled into ``chat_pb2`` have their comments stripped, so ``grpcurl describe``
would show bare signatures. ``make proto`` also writes a descriptor set with source info; this
servicer answers with those documented file descriptors, so callers read every comment.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from qwen_grpc.v1 import chat_pb2

CHAT_SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


def _documented_files() -> dict[str, bytes]:
    raw = resources.files("qwen_grpc.v1").joinpath("chat_descriptor.binpb").read_bytes()
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(raw)
    return {file.name: file.SerializeToString() for file in descriptor_set.file}


class DocumentedReflectionServicer(reflection.ReflectionServicer):
    """The stock reflection servicer, with our files swapped for their documented versions."""

    def __init__(self, service_names: tuple[str, ...]) -> None:
        super().__init__(service_names)
        self._documented = _documented_files()

    def ServerReflectionInfo(
        self,
        request_iterator: Iterator[reflection_pb2.ServerReflectionRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for index, serialized in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
                    files[index] = self._documented.get(name, serialized)
            yield response


def enable_reflection(server: grpc.Server) -> None:
    """Serves reflection for the chat, health and reflection services."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        DocumentedReflectionServicer(
            (CHAT_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        ),
        server,
    )
