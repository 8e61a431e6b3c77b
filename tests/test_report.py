"""The HTML report shows the top units and escapes every training text."""

from __future__ import annotations

import re

import bgotrace
from bgotrace.corpus import Document
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

EVIL = '<script>alert("x")</script> Paris is the capital of France.'


def test_report_escapes_training_text(tmp_path):
    tokenizer = make_tiny_tokenizer()
    docs = [Document("evil", EVIL, "web"), Document("fox", "The quick brown fox.", "animals")]
    bgotrace.attribute(
        tiny_gpt2(tokenizer),
        tokenizer,
        docs,
        prompt="Paris is the capital of",
        completion=" France.",
        out=tmp_path / "run",
        config={"corpus": {"max_length": 32}, "perturb": {"steps": 1}},
    )
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<script" not in html
    text = re.sub(r"<[^>]+>", "", html)  # the text a browser shows, tags stripped
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
    assert "Paris is the capital of" in html and "fox" in html
    assert html.count("<tr>") >= 3  # header + both units
