"""grokserve.transport: the contract between routers and expert workers, which both depend on.

The wire codec and message limits (`wire`), placement (`placement`), typed dispatch errors (`errors`), the
data-plane channels to one worker replica (`channel`: the interface; `grpc_channel`: gRPC), TLS material
(`tls`), pinned host staging (`staging`), the event-loop thread (`loop_thread`), the `/metrics` server
helper (`metrics_server`) and the machine-readable readiness line (`lifecycle`).
"""
