"""gRPC frontend: KServe v2 ``inference.GRPCInferenceService`` and ``grpc.health.v1``."""

from triserve.frontends.grpc.service import create_grpc_server

__all__ = ["create_grpc_server"]
