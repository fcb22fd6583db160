"""The model side of the service: loading, generation and the one thread that owns the model.

Nothing here knows about gRPC or protobuf: plain Python types go in and come out, so the
engine can be tested, benchmarked and replaced without touching the servicer.
"""
