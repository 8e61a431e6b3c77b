"""The HTML report as a browser shows it: headless Chromium loads the page, we read its DOM.

Skipped when no ``chromium`` is installed (``.ci/run`` installs Debian's package).
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.image
import pytest

import bgotrace
from bgotrace.corpus import Document
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TITLE = "bgotrace report"
# Each would set the page title if the browser ran it.
SCRIPT = "<script>document.title='pwned-script'</script>"
ONERROR = "<img src=x onerror=\"document.title='pwned-onerror'\">"


class DomSummary(HTMLParser):
    """Tags, attributes and text of a page, as parsed from Chromium's serialized DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_title:
            self.title += data

    def having(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [
            a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())
        ]


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=2000",  # let any script that slipped through run
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    tokenizer = make_tiny_tokenizer()
    docs = [
        Document("evil-script", f"{SCRIPT} Paris is the capital of France.", "web"),
        Document("evil-img", f"Water boils {ONERROR} at one hundred degrees.", ONERROR),
        Document("fox", "The quick brown fox jumps over the lazy dog.", "animals"),
    ]
    bgotrace.attribute(
        tiny_gpt2(tokenizer),
        tokenizer,
        docs,
        prompt="Paris is the capital of",
        completion=" France. Water boils at one hundred degrees.",
        out=root / "run",
        config={
            "corpus": {"max_length": 64},
            "perturb": {"steps": 2},
            "query": {"spans": "sentence"},
        },
    )
    return root / "run" / "report.html"


@pytest.fixture(scope="module")
def dom(report, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    proc = chromium(tmp_path_factory.mktemp("chromium"), "--dump-dom", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = DomSummary()
    parsed.feed(proc.stdout)
    return parsed


def test_training_markup_is_shown_as_text_and_runs_nothing(dom):
    assert dom.title == TITLE  # neither script changed it
    assert dom.having("script") == []
    assert not any("onerror" in attrs for _, attrs in dom.elements)
    assert not any(a.get("src") == "x" for a in dom.having("img"))  # no <img> from the corpus
    text = "".join(dom.text)
    assert SCRIPT in text and ONERROR in text  # shown literally, as the corpus holds it


def test_figures_are_embedded_images(dom):
    images = [a for a in dom.having("img") if str(a.get("src", "")).startswith("data:image/png")]
    assert {a["alt"] for a in images} == {
        "score distribution",
        "source shares",
        "query loss trajectories",
    }


def test_span_elements_link_to_their_units(dom):
    spans = [a for t, a in dom.elements if t == "a" and a.get("class") == "span"]
    assert len(spans) == 2  # two sentences
    ids = [a.get("id") for _, a in dom.elements]
    for span in spans:
        target = str(span["href"]).removeprefix("#")
        assert target in ids
        # The panel the span opens lists that span's units.
        start = next(i for i, (_, a) in enumerate(dom.elements) if a.get("id") == target)
        following = dom.elements[start + 1 :]
        end = next((i for i, (t, a) in enumerate(following) if t == "section"), len(following))
        units = [a for t, a in following[:end] if t == "tr" and a.get("class") == "unit"]
        assert units and all(a.get("data-unit-id") for a in units)


def test_screenshot_is_written_and_not_blank(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "report.png"
    proc = chromium(
        tmp_path,
        "--hide-scrollbars",
        "--window-size=1000,1400",
        f"--screenshot={shot}",
        report.as_uri() + "#q0-s1",  # open the second span's panel
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)  # (H, W, channels) floats in [0, 1]
    assert pixels.shape[:2] == (1400, 1000)
    assert pixels[..., :3].std() > 0.05  # text, tables and figures, not one flat colour
    assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.01  # some dark ink on the page
