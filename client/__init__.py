"""grokserve.client: call a grokserve router over gRPC, synchronously or with asyncio.

    from grokserve.client import Client
    with Client("localhost:50051") as client:
        for chunk in client.generate_stream("The answer to life is", max_tokens=32):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc

from grokserve.v1 import generation_pb2 as gen_pb
from grokserve.v1 import generation_pb2_grpc as gen_grpc

__all__ = ["AsyncClient", "Client", "build_request", "gen_pb"]

_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def build_request(prompt: str | list[int], *, max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                  stop_token_ids: list[int] | None = None, logprobs: int = 0, ignore_eos: bool = False,
                  request_id: str = "", n: int = 1, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                  repetition_penalty: float | None = None, min_p: float = 0.0,
                  logit_bias: dict[int, float] | None = None, min_tokens: int = 0,
                  prompt_logprobs: int | None = None) -> gen_pb.GenerateRequest:
    """A GenerateRequest (generation.proto documents every field and its default)."""
    req = gen_pb.GenerateRequest(request_id=request_id, top_k=top_k, stop=stop or [],
                                 stop_token_ids=stop_token_ids or [], logprobs=logprobs, ignore_eos=ignore_eos,
                                 n=n, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 min_p=min_p, logit_bias=logit_bias or {}, min_tokens=min_tokens)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(prompt)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed),
                        ("repetition_penalty", repetition_penalty), ("prompt_logprobs", prompt_logprobs)):
        if value is not None:
            setattr(req, name, value)
    return req


def _auth(token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {token}")] if token else None


class Client:
    """Blocking client. Every call takes a deadline (`timeout`, seconds); `credentials` for TLS, `token`
    for a router that requires bearer tokens."""

    def __init__(self, address: str, timeout: float = 60.0, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None):
        self.timeout = timeout
        self.metadata = _auth(token)
        self.channel = (grpc.secure_channel(address, credentials, options=_OPTIONS) if credentials
                        else grpc.insecure_channel(address, options=_OPTIONS))
        self.stub = gen_grpc.GenerationStub(self.channel)

    def generate(self, prompt: str | list[int], timeout: float | None = None, **kwargs) -> gen_pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout or self.timeout,
                                  metadata=self.metadata)

    def generate_stream(self, prompt: str | list[int], timeout: float | None = None, **kwargs
                        ) -> Iterator[gen_pb.GenerateResponse]:
        yield from self.stub.GenerateStream(build_request(prompt, **kwargs), timeout=timeout or self.timeout,
                                            metadata=self.metadata)

    def tokenize(self, text: str) -> list[int]:
        return list(self.stub.Tokenize(gen_pb.TokenizeRequest(text=text), timeout=self.timeout,
                                       metadata=self.metadata).token_ids)

    def model_info(self) -> gen_pb.ModelInfoResponse:
        return self.stub.GetModelInfo(gen_pb.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio)."""

    def __init__(self, address: str, timeout: float = 60.0, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None):
        self.timeout = timeout
        self.metadata = _auth(token)
        self.channel = (grpc.aio.secure_channel(address, credentials, options=_OPTIONS) if credentials
                        else grpc.aio.insecure_channel(address, options=_OPTIONS))
        self.stub = gen_grpc.GenerationStub(self.channel)

    async def generate(self, prompt: str | list[int], timeout: float | None = None, **kwargs
                       ) -> gen_pb.GenerateResponse:
        return await self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout or self.timeout,
                                        metadata=self.metadata)

    async def generate_stream(self, prompt: str | list[int], timeout: float | None = None, **kwargs
                              ) -> AsyncIterator[gen_pb.GenerateResponse]:
        async for chunk in self.stub.GenerateStream(build_request(prompt, **kwargs), timeout=timeout or self.timeout,
                                                    metadata=self.metadata):
            yield chunk

    async def model_info(self) -> gen_pb.ModelInfoResponse:
        return await self.stub.GetModelInfo(gen_pb.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
