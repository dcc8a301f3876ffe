"""The Space in a real headless Chromium (Debian's ``chromium``, driven by Playwright): load the page,
send a prompt, see two answers appear, save a screenshot and check it is not blank; and, in the default
mode started as users start it (``test_space.DefaultSpace``), see the status line and the Results tab's
figure.

Skips with the reason when chromium or playwright is missing (``.ci/run`` installs chromium with apt).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_space import start_default_space, wait_for_results

CHROMIUM = os.environ.get("HF_RESIDUAL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM}: apt-get install chromium to run it"
    ),
]


def _blank(png: Path) -> bool:
    """True when the screenshot is (almost) one colour: a page that did not render."""
    from PIL import Image, ImageStat

    image = Image.open(png).convert("L")
    colours = image.getcolors(maxcolors=1 << 16) or []
    return len(colours) < 16 or ImageStat.Stat(image).stddev[0] < 5


def test_page_streams_two_answers_and_renders(tmp_path, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    from test_space import launch_space

    demo = launch_space(tmp_path / "space", monkeypatch)
    shot = tmp_path / "space.png"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(demo.local_url)
                page.locator("#model-3 input").wait_for()
                # Two models: the third slot is emptied, as a user would.
                page.locator("#model-3 input").fill("(none)")
                page.locator("#model-3 input").press("Enter")
                page.wait_for_function(
                    "() => document.querySelector('#chat-3 [data-testid=block-label]').innerText.includes('no model')"
                )
                page.locator("#prompt textarea").fill("Answer in upper case: hello")
                page.locator("#send").click()
                answers = [page.locator(f"#chat-{i} .message.bot") for i in (1, 2)]
                for answer in answers:
                    answer.last.wait_for(timeout=60_000)
                page.wait_for_function(
                    "() => ['#chat-1', '#chat-2'].every(id => { const m = document.querySelectorAll("
                    "id + ' .message.bot'); return m.length && m[m.length - 1].innerText.trim().length > 0; })",
                    timeout=60_000,
                )
                texts = [a.last.inner_text().strip() for a in answers]
                assert all(texts), texts
                assert page.locator("#chat-3 .message.bot").count() == 0
                assert (
                    page.locator("#chat-1 .message.user").last.inner_text().strip()
                    == "Answer in upper case: hello"
                )
                labels = page.locator("[data-testid=block-label]").all_inner_texts()
                assert any("instruct (instruct)" in label for label in labels), labels
                assert any("cpt (CPT'd base)" in label for label in labels), labels
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    keep = os.environ.get("HF_RESIDUAL_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    assert shot.stat().st_size > 10_000
    assert not _blank(shot), "the screenshot is blank: the page did not render"


@pytest.fixture(scope="session")
def default_space(request):
    return start_default_space(request)


def test_default_mode_shows_its_status_and_the_results_figure(default_space, tmp_path):
    """No configuration, HOME outside the temp directory and the repository: the status line says what the
    start-up does (training on a first start, then ready), and the Results tab shows the demo's figure."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    shot = tmp_path / "results.png"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            trained = (default_space.cache / "demo-tiny" / "results.json").is_file()
            page.goto(default_space.url, timeout=120_000)
            status = page.locator("#status")
            status.wait_for(timeout=120_000)
            if not trained:  # a first start: the page says it trains (unless it just finished)
                text = status.inner_text()
                assert "Training the tiny family" in text or "Models ready" in text, text
            wait_for_results(default_space.client())
            status.get_by_text("Models ready").wait_for(timeout=30_000)
            # The pickers, empty while the models were prepared, now show the demo's models.
            page.wait_for_function(
                "() => document.querySelector('#chat-1 [data-testid=block-label]').innerText"
                ".includes('instruct (instruct)')",
                timeout=30_000,
            )
            assert page.locator("#model-3 input").input_value() == "ported-S"
            page.get_by_role("tab", name="Results").click()
            page.wait_for_function(
                "() => { const i = document.querySelector('#results-plot img');"
                " return i && i.complete && i.naturalWidth > 0; }",
                timeout=60_000,
            )
            width = page.locator("#results-plot img").evaluate("image => image.naturalWidth")
            assert width > 100, width
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not _blank(shot), "the screenshot is blank: the page did not render"
