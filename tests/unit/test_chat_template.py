"""The chat endpoint's templates: the default transcript, operators' files, and Jinja's sandbox."""

from __future__ import annotations

import pytest

from grokserve.router.chat_template import DEFAULT_CHAT_STOP, ChatTemplate, ChatTemplateError
from grokserve.router.http_api import chat_template_from

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Who?"}]


def test_the_default_template_is_a_plain_transcript_ending_with_the_assistant_turn():
    text = ChatTemplate().render(MESSAGES)
    assert text == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Who?\n\nAssistant:"
    assert ChatTemplate().render(MESSAGES[:2], add_generation_prompt=False) == "Be brief.\n\nHuman: Hi\n\n"
    assert any(stop in "\n\nHuman: next" for stop in DEFAULT_CHAT_STOP)  # the next human turn stops generation


def test_an_operators_template_file_and_its_stop_strings(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    template = chat_template_from(str(path), ["<|user|>"])
    assert template.render(MESSAGES[1:2]) == "<|user|>Hi<|assistant|>" and template.stop == ("<|user|>",)
    assert chat_template_from(None, None).stop == DEFAULT_CHAT_STOP
    assert chat_template_from(None, []).stop == ()


def test_bad_templates_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="chat_template"):
        ChatTemplate("{% for m in messages %}")  # unclosed
    with pytest.raises(ValueError, match="chat_template: cannot read"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")
    with pytest.raises(ChatTemplateError):  # the sandbox refuses what a template must not reach
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(MESSAGES)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ raise_exception('no system role') if true }}{{ undefined_call() }}").render(MESSAGES)
