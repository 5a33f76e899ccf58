"""Tokenizer, streaming detokenization, stop strings and sampling behave as clients rely on."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grokserve.model.sampling import SamplingParams, make_generator, sample
from grokserve.model.text_stream import TextStream


def test_official_tokenizer_encodes_the_facts_example(official_tokenizer):
    ids = official_tokenizer.encode("The answer to life the universe and everything is of course")
    assert ids == [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805]
    assert (official_tokenizer.pad_id, official_tokenizer.bos_id, official_tokenizer.eos_id) == (0, 1, 2)
    assert official_tokenizer.encode("x", add_bos=True)[0] == 1


# byte-fallback pieces (69-324), user-defined pieces (4-68), ordinary pieces and the specials
_token_ids = st.one_of(st.integers(0, 400), st.integers(69, 324), st.integers(400, 131071))


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(_token_ids, min_size=1, max_size=40))
def test_streaming_detokenization_concatenates_to_decode(official_tokenizer, ids):
    detok = official_tokenizer.detokenizer()
    text = "".join(detok.push(t) for t in ids) + detok.flush()
    assert text == official_tokenizer.decode(ids)


def test_streaming_holds_back_incomplete_utf8(official_tokenizer):
    ids = official_tokenizer.encode("naïve 🙂 ok")
    detok = official_tokenizer.detokenizer()
    deltas = [detok.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == "naïve 🙂 ok"


def test_detokenizer_keeps_leading_space_after_prompt(official_tokenizer):
    prompt = official_tokenizer.encode("Hello")
    continuation = official_tokenizer.encode("Hello world")[len(prompt):]
    detok = official_tokenizer.detokenizer(prompt)
    assert "".join(detok.push(t) for t in continuation) + detok.flush() == " world"


class _ScriptedDetok:
    """Feeds fixed text pieces; the stop logic is independent of the tokenizer."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def push(self, _token):
        return self.pieces.pop(0)

    def flush(self):
        return ""


def test_stop_string_is_never_leaked_even_partially():
    stream = TextStream(_ScriptedDetok(["Hello ", "wor", "ld", "END", "more"]), stop=("world",))
    sent = [stream.push(0) for _ in range(3)]
    assert sent == ["Hello ", "", ""] and stream.stopped  # "wor" held back, then cut at the match


def test_held_back_prefix_is_released_when_it_stops_matching():
    stream = TextStream(_ScriptedDetok(["a wo", "ndrous"]), stop=("world",))
    assert stream.push(0) == "a "
    assert stream.push(0) == "wondrous" and not stream.stopped
    assert stream.finish() == ""


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible():
    logits = torch.randn(512, generator=torch.Generator().manual_seed(0))
    assert sample(logits, SamplingParams(), make_generator(1)).token_id == int(logits.argmax())
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    draws = lambda: [sample(logits, params, g).token_id for g in [make_generator(7)] for _ in range(20)]  # noqa: E731
    assert draws() == draws()
    assert len(set(draws())) > 1


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    gen = make_generator(3)
    assert {sample(logits, SamplingParams(temperature=2.0, top_k=2), gen).token_id for _ in range(200)} <= {0, 1}
    # top_p=0.5: token 0 alone has probability > 0.5 → always chosen
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), gen).token_id for _ in range(50)} == {0}


def test_logprobs_are_normalised_and_top_n_sorted():
    logits = torch.randn(100)
    token = sample(logits, SamplingParams(logprobs=3), make_generator(0))
    assert math.isclose(token.logprob, float(torch.log_softmax(logits, -1).max()), rel_tol=1e-6)
    values = [lp for _, lp in token.top_logprobs]
    assert len(values) == 3 and values == sorted(values, reverse=True)


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"stop_token_ids": (600,)}, "stop_token_ids"), ({"logprobs": 99}, "logprobs"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate(vocab_size=512)
