"""`lightspan.PromptTemplate`: named placeholders checked where the template is written."""

from __future__ import annotations

import pytest

import lightspan
from lightspan.errors import InvalidInput


def test_placeholders_and_format() -> None:
    template = lightspan.PromptTemplate("Answer {question} in {style}. Keep {{braces}}.")
    assert template.placeholders == {"question", "style"}
    assert template.format(question="2+2", style="one word") == "Answer 2+2 in one word. Keep {braces}."


@pytest.mark.parametrize("text", ["{}", "{0}", "{a.b}", "{a[0]}", "{unclosed", "stray }"])
def test_a_template_that_is_not_named_placeholders_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="prompt template"):
        lightspan.PromptTemplate(text)


def test_a_missing_value_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"\['style'\]"):
        lightspan.PromptTemplate("{question} {style}").format(question="q")
