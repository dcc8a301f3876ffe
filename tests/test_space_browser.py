"""The Space in a real headless Chromium (Debian's ``chromium``, driven by Playwright): load the page,
send a prompt, see two answers appear, save a screenshot and check it is not blank.

Skips with the reason when chromium or playwright is missing (``.ci/run`` installs chromium with apt).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
