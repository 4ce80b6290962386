"""End-to-end: the web UI in headless Chromium (Debian's package, installed by `make setup`), driven by Playwright.

Assertions are on what the page shows. Every test saves a screenshot into $CONCEPTKIT_SCREENSHOTS (default
outputs/ui-screenshots); `make screenshots` writes the README's ones this way.
"""
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from conceptkit.evaluate.profusion import TEST_TRIPLES
from conceptkit.evaluate.profusion import test_scene as scene_of
from conceptkit.shapes.render import render

playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")
expect = playwright.expect

CHROMIUM = os.environ.get("CONCEPTKIT_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("CONCEPTKIT_SCREENSHOTS", "outputs/ui-screenshots"))
CONCEPT = Path(__file__).resolve().parents[1] / "src/conceptkit/bundled/concepts/red-striped-star"
# the closed network: without these, Chromium keeps trying to reach Google's services
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conceptkit.ui.app import serve

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    port = free_port()
    app, queue = serve(port=port, work=str(tmp_path_factory.mktemp("ui")), block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make setup` (installs Debian's chromium) or set "
                    "CONCEPTKIT_CHROMIUM to a Chromium executable")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server, request):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.goto(server)
    page.wait_for_selector("#generate-button", timeout=60_000)
    yield page
    if not getattr(page, "shot_taken", False):  # the page as the test left it (a failed test: where it stopped)
        shot(page, request.node.name.removeprefix("test_"))
    page.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.shot_taken = True


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def upload(page, where: str, files) -> None:
    page.locator(f"{where} input[type=file]").set_input_files(files)
    page.wait_for_timeout(1500)  # the upload finishing before the click that uses it


def test_generate_shows_images_and_the_command(page):
    page.click("#generate-button")
    expect(page.locator("#generate-gallery img")).to_have_count(2, timeout=60_000)
    expect(page.locator("#generate-info")).to_contain_text("conceptkit generate --model toy")
    expect(page.locator("#generate-info")).to_contain_text("2 image(s)")
    shot(page, "generate")


def test_bad_upload_shows_a_one_line_error(page, tmp_path):
    bad = tmp_path / "holiday.png"
    bad.write_text("not an image")
    tab(page, "Learn")
    upload(page, "#learn-files", [str(bad)])
    page.click("#learn-start")
    expect(page.locator("#learn-message")).to_contain_text("holiday.png is not an image", timeout=20_000)
    expect(page.locator("#learn-message")).not_to_contain_text("Traceback")


def test_textual_inversion_progress_reaches_the_end(page):
    tab(page, "Learn")
    upload(page, "#learn-files", sorted(str(p) for p in CONCEPT.glob("*.png"))[:3])
    page.locator("#learn-name input, #learn-name textarea").first.fill("<ui-star>")
    page.locator("#learn-steps input").fill("20")
    page.click("#learn-start")
    progress = page.locator("#learn-progress")
    expect(progress).to_contain_text("<ui-star>", timeout=30_000)
    expect(progress).to_contain_text("100%", timeout=180_000)
    expect(progress).to_contain_text("step 20/20")
    expect(progress).to_contain_text("done", timeout=60_000)
    expect(page.locator("#learn-validation img").first).to_be_visible(timeout=30_000)
    expect(page.locator("#learn-result")).to_contain_text("Embeddings")
    shot(page, "learn")
    # the learned token is offered in the Generate tab
    tab(page, "Generate")
    page.get_by_label("Embeddings (learned tokens)").click()
    expect(page.get_by_role("option", name=re.compile("ui-star"))).to_be_visible(timeout=10_000)


def test_compose_two_bundled_loras_shows_images_maps_and_masks(page):
    tab(page, "Compose")
    page.get_by_label("Steps").last.fill("12")
    page.click("#compose-button")
    expect(page.locator("#compose-gallery img")).to_have_count(2, timeout=240_000)  # clora and merge
    expect(page.locator("#compose-attention img")).to_be_visible(timeout=30_000)
    expect(page.locator("#compose-masks img")).to_be_visible()
    expect(page.locator("#compose-progress")).to_contain_text("done", timeout=30_000)
    expect(page.locator("#compose-progress")).to_contain_text("100%")
    shot(page, "compose")


def test_profusion_with_and_without_fusion(page, tmp_path):
    reference = tmp_path / "object.png"
    Image.fromarray(render(scene_of(TEST_TRIPLES[0]))).save(reference)
    tab(page, "ProFusion")
    upload(page, "#profusion-image", str(reference))
    page.locator("#profusion-steps input").fill("5")
    page.locator("#profusion-sample-steps input").fill("10")
    page.click("#profusion-button")
    expect(page.locator("#profusion-progress")).to_contain_text("done", timeout=300_000)
    expect(page.locator("#profusion-fusion img")).to_be_visible(timeout=30_000)
    expect(page.locator("#profusion-plain img")).to_be_visible()
    shot(page, "profusion")


def test_a_reload_shows_the_running_job_a_second_user_queues_and_cancel_stops_it(page, browser, server):
    images = sorted(str(p) for p in CONCEPT.glob("*.png"))[:3]
    tab(page, "Learn")
    upload(page, "#learn-files", images)
    page.locator("#learn-name input, #learn-name textarea").first.fill("<long-job>")
    page.locator("#learn-steps input").fill("5000")
    page.click("#learn-start")
    expect(page.locator("#learn-progress")).to_contain_text("running", timeout=60_000)
    page.reload()
    page.wait_for_selector("#generate-button", timeout=60_000)
    tab(page, "Learn")
    progress = page.locator("#learn-progress")
    expect(progress).to_contain_text("<long-job>", timeout=20_000)
    expect(progress).to_contain_text("running")
    expect(progress).to_contain_text(re.compile(r"step \d+/5000"), timeout=60_000)
    # another user (a separate browser context: no shared state but the server) queues behind it
    other = browser.new_context(viewport={"width": 1300, "height": 1000}).new_page()
    other.goto(server)
    other.wait_for_selector("#generate-button", timeout=60_000)
    tab(other, "Learn")
    upload(other, "#learn-files", images)
    other.locator("#learn-name input, #learn-name textarea").first.fill("<second-user>")
    other.locator("#learn-steps input").fill("5")
    other.click("#learn-start")
    expect(other.locator("#learn-progress")).to_contain_text("queued (1 job ahead)", timeout=20_000)
    shot(other, "second-user-queued")
    page.click("#learn-cancel")
    expect(progress).to_contain_text("cancelled", timeout=20_000)
    expect(other.locator("#learn-progress")).to_contain_text("done", timeout=120_000)
    expect(other.locator("#learn-progress")).to_contain_text("step 5/5")
    other.context.close()
