"""The OpenAI-compatible HTTP API with real clients: the official `openai` package and raw HTTP (httpx) against a
live router (real uvicorn on loopback, the bundled demo model with its tokenizer), checked against the gRPC API
of the same router and against the reference engine."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from certs import CertificateAuthority
from procs import RouterHarness, WorkerProc, scrape

from grokserve.client import Client
from grokserve.cluster.spec import DEMO_CHECKPOINT
from grokserve.model.engine import ReferenceEngine
from grokserve.router.auth import load_tokens
from grokserve.router.settings import EngineLimits
from grokserve.transport.tls import TlsFiles

MODEL = "grokserve-demo"
PROMPT = "And God said"


@pytest.fixture(scope="module")
def router():
    harness = RouterHarness(DEMO_CHECKPOINT, http=True, metrics=True,
                            limits=EngineLimits(kv_cache_mb=4, max_queue=8))
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def client(router):
    with openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    return ReferenceEngine.from_checkpoint(DEMO_CHECKPOINT, "grokserve")


SAMPLING = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "presence_penalty": 0.5, "frequency_penalty": 0.3}


def test_completions_equal_the_grpc_answer_for_the_same_seed(router, client):
    extra = {"top_k": 40, "min_p": 0.02, "repetition_penalty": 1.1, "min_tokens": 4}
    http = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, logit_bias={"5": 3.0},
                                     extra_body=extra, **SAMPLING)
    with Client(router.address, timeout=60) as grpc_client:
        answer = grpc_client.generate(PROMPT, max_tokens=12, logit_bias={5: 3.0}, **SAMPLING, **extra)
    assert http.choices[0].text == answer.text and answer.text
    assert http.usage.completion_tokens == answer.usage.completion_tokens
    assert http.usage.prompt_tokens == answer.usage.prompt_tokens
    assert http.choices[0].finish_reason == "length" and http.model == MODEL


def test_chat_streaming_equals_chat_whole_and_reports_usage(client):
    messages = [{"role": "system", "content": "The book of Genesis."}, {"role": "user", "content": "Who made light?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=3, temperature=0.7)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=3,
                                                 temperature=0.7, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"


def test_n_choices_share_the_prompt_and_choice_zero_is_the_single_answer(client):
    one = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=5, temperature=1.0)
    many = client.completions.create(model=MODEL, prompt=[PROMPT, "In the beginning"], max_tokens=8, seed=5,
                                     temperature=1.0, n=3)
    assert sorted(c.index for c in many.choices) == list(range(6))
    by_index = {c.index: c.text for c in many.choices}
    assert by_index[0] == one.choices[0].text
    assert len({by_index[i] for i in range(3)}) > 1  # seeds 5, 6, 7 draw differently
    assert many.usage.completion_tokens == 6 * 8


def test_echo_logprobs_equal_the_reference_engine(client, reference, router):
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, echo=True)
    choice = answer.choices[0]
    ids = router.router.tokenizer.encode(PROMPT)
    assert choice.text.startswith(router.router.tokenizer.decode(ids))
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None
    generated = router.router.tokenizer.encode(choice.text)[len(ids):]
    full = ids + generated[:3]
    want = torch.log_softmax(reference.logits(full).double(), dim=-1)  # [T, V], f64
    expected = [float(want[i, full[i + 1]]) for i in range(len(full) - 1)]
    np.testing.assert_allclose(lp.token_logprobs[1:len(full)], expected, atol=2e-3)
    assert all(len(top) == 3 for top in lp.top_logprobs[1:])


def test_errors_are_openai_error_objects_with_the_right_status(client, router):
    cases = [
        ({"temperature": -1}, 400, "temperature"),
        ({"n": 99}, 400, "n"),
        ({"logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"max_tokens": 100000}, 400, "max_tokens"),
        ({"presence_penalty": 3}, 400, "presence_penalty"),
        ({"best_of": 2}, 400, "best_of"),
    ]
    for extra, status, param in cases:
        body = {"model": MODEL, "prompt": PROMPT, **extra}
        reply = httpx.post(f"{router.http_url}/v1/completions", json=body, timeout=30)
        assert reply.status_code == status, (extra, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.RateLimitError):  # more sequences than the queue holds (max_queue = 8)
        client.completions.create(model=MODEL, prompt=PROMPT, n=9, max_tokens=2)
    big = httpx.post(f"{router.http_url}/v1/completions", content=b"{" + b" " * (8 << 20) + b"}", timeout=30,
                     headers={"content-type": "application/json"})
    assert big.status_code == 413
    assert httpx.post(f"{router.http_url}/v1/completions", content=b"{not json", timeout=30).status_code == 400


def test_sse_framing_is_data_lines_ending_with_done(router):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{router.http_url}/v1/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        raw = reply.read().decode()
    events = [e for e in raw.replace("\r\n", "\n").split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len(chunks) == 5 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def generated_tokens(router) -> float:
    return sum(v for _, v in scrape(router.metrics_port)["grokserve_generation_tokens_total"])


def test_a_client_that_goes_away_cancels_its_request_and_frees_its_blocks(router):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    before = generated_tokens(router)
    with httpx.stream("POST", f"{router.http_url}/v1/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert router.engine.load()["running"] == 1
    load = router.idle(timeout=10)  # closed after the first token: the sequence must leave
    assert load["running"] == 0 and load["free_blocks"] == load["total_blocks"]
    assert generated_tokens(router) - before < 200  # it stopped, rather than running its 400 tokens out

    async def abandon() -> None:  # a whole (non-streaming) request whose client stops waiting
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{router.http_url}/v1/completions", timeout=0.5,
                                json={**body, "stream": False})

    before = generated_tokens(router)
    asyncio.run(abandon())
    load = router.idle(timeout=10)
    assert load["running"] == 0 and load["free_blocks"] == load["total_blocks"]
    assert generated_tokens(router) - before < 200


def test_probes_models_tokenize_and_detokenize(router, client):
    assert httpx.get(f"{router.http_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{router.http_url}/ready").json()["status"] == "ready"
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].model_extra["max_model_len"] == 512
    ids = httpx.post(f"{router.http_url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert ids == router.router.tokenizer.encode(PROMPT)
    assert httpx.post(f"{router.http_url}/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    bad = httpx.post(f"{router.http_url}/detokenize", json={"tokens": [99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_request_metrics_carry_the_api_label(router, client):
    before = scrape(router.metrics_port)

    def count(samples, api):
        return sum(v for labels, v in samples.get("grokserve_request_status_total", [])
                   if labels.get("api") == api and labels.get("code") == "OK")

    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    with Client(router.address, timeout=30) as grpc_client:
        grpc_client.generate(PROMPT, max_tokens=2)
    after = scrape(router.metrics_port)
    assert count(after, "http") - count(before, "http") == 1
    assert count(after, "grpc") - count(before, "grpc") == 1


def test_bearer_tokens_and_tls_guard_the_http_api(tmp_path):
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = CertificateAuthority("cluster")
    ca_file = ca.write(folder)
    cert, key = ca.issue(folder, "router-api", dns=("localhost",), ips=("127.0.0.1",))
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("alpha-secret\n")
    harness = RouterHarness(DEMO_CHECKPOINT, http=True, tls=TlsFiles(str(cert), str(key)),
                            tokens=load_tokens(tokens_file))
    try:
        assert harness.http_url.startswith("https://")
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # plaintext HTTP to the TLS port
            httpx.get(harness.http_url.replace("https://", "http://") + "/health", timeout=5)
        with httpx.Client(verify=str(ca_file), timeout=30) as http:
            assert http.get(f"{harness.http_url}/health").status_code == 200  # probes stay open
            denied = http.post(f"{harness.http_url}/v1/completions", json={"model": MODEL, "prompt": PROMPT})
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=f"{harness.http_url}/v1", api_key="wrong", max_retries=0,
                           http_client=httpx.Client(verify=str(ca_file))) as wrong, \
                pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with openai.OpenAI(base_url=f"{harness.http_url}/v1", api_key="alpha-secret", max_retries=0,
                           http_client=httpx.Client(verify=str(ca_file))) as right:
            answer = right.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert answer.usage.completion_tokens == 3
    finally:
        harness.close()


def test_an_unavailable_shard_is_503(tmp_path):
    workers = [WorkerProc(DEMO_CHECKPOINT, "all", experts) for experts in ("0-3", "4-7")]
    harness = None
    try:
        for worker in workers:
            worker.wait_serving()
        harness = RouterHarness(DEMO_CHECKPOINT, [w.address for w in workers], http=True)
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{harness.http_url}/v1/completions", json=body, timeout=30).status_code == 200
        workers[1].kill()
        time.sleep(0.5)
        reply = httpx.post(f"{harness.http_url}/v1/completions", json=body, timeout=30)
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["type"] == "service_unavailable"
    finally:
        if harness is not None:
            harness.close()
        for worker in workers:
            worker.kill()
