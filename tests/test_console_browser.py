"""The web console in a real browser: Debian's Chromium, driven headless by Playwright, against a
real service and its worker (the same ``Server`` as the end-to-end tests, with an API key).

One tiny job (2 x 32 calibration tokens, 2 grid points) is submitted from the form and watched
to success on the jobs page; its page must show the per-block chart and the downloads; the chat
playground must stream text from its result; a second job is cancelled from its page. Each page
must fit 400 px and label its fields.

``--console-screenshots DIR`` also saves the README's screenshots of each page (generated
output: ``python -m pytest tests/test_console_browser.py -p no:xdist --console-screenshots docs/img``).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from test_service_e2e import BUILTIN, KEY, Server

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install 'metal-marlin[dev]')")

N_BLOCKS = 30  # SmolLM2-135M's transformer blocks
JOB_TIMEOUT_S = 240
SHOT_VIEWPORT = {"width": 1024, "height": 800}


def chromium_path() -> str:
    """Debian's Chromium (Playwright's own browser downloads are not reachable here)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium: install Debian's chromium package (apt-get install chromium; .ci/run does when it runs as root)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("console")
    (base / "models").mkdir()
    srv = Server(base / "data", base / "models", base / "service.log")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        srv.http.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    """A page signed in with the key (stored as the login form stores it). ``bypass_csp`` lets
    Playwright evaluate its probes; the pages themselves never need it."""
    context = browser.new_context(viewport=SHOT_VIEWPORT, bypass_csp=True)
    context.add_init_script(f"localStorage.setItem('mm-api-key', {KEY!r})")
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert errors == [], errors


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest) -> Path | None:
    out = request.config.getoption("--console-screenshots")
    if out is None:
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(pg: Any, shots: Path | None, name: str, *, down_to: str | None = None) -> None:
    """Save ``console-<name>.png`` when screenshots were asked for; ``down_to``: the page from
    its top to the bottom of that element (the README's images stay small)."""
    if shots is None:
        return
    clip = None
    if down_to is not None:
        box = pg.locator(down_to).bounding_box()
        clip = {"x": 0, "y": 0, "width": SHOT_VIEWPORT["width"], "height": box["y"] + box["height"] + 16}
    pg.screenshot(path=str(shots / f"console-{name}.png"), full_page=clip is not None, clip=clip)


def submit_tiny_job(pg: Any) -> None:
    """Fill the form with the smallest calibration the API takes and submit it from the keyboard."""
    pg.get_by_label("Model", exact=True).select_option(BUILTIN)
    pg.get_by_label("Calibration samples").fill("2")
    pg.get_by_label("Tokens per sample").fill("32")
    pg.get_by_text("More settings").click()
    pg.get_by_label("Scale-search grid points").fill("2")
    pg.get_by_label("Tokens per sample").press("Enter")


def newest_job(server: Server) -> str:
    return server.http.get("/v1/quantization/jobs?limit=1").json()["data"][0]["id"]


# ---------------------------------------------------------------------------------------
def test_login_form_then_the_jobs_page(browser: Any, server: Server, shots: Path | None) -> None:
    assert httpx.get(f"{server.url}/v1/quantization/jobs").status_code == 401  # the data needs the key
    context = browser.new_context(viewport=SHOT_VIEWPORT)
    pg = context.new_page()
    pg.goto(server.url + "/")
    pg.get_by_label("API key").wait_for()
    assert pg.locator("#view").inner_text() == ""
    screenshot(pg, shots, "login")
    pg.get_by_label("API key").fill("wrong")
    pg.get_by_role("button", name="Sign in").click()
    pg.get_by_text("That key is not accepted by this server.").wait_for()
    pg.get_by_label("API key").fill(KEY)
    pg.get_by_label("API key").press("Enter")
    pg.get_by_role("heading", name="New quantization job").wait_for()
    assert pg.evaluate("localStorage.getItem('mm-api-key')") == KEY
    # the model picker lists what the server can quantize, and an upload
    options = pg.get_by_label("Model", exact=True).locator("option").all_inner_texts()
    assert options[0] == BUILTIN and options[-1].startswith("Upload")
    pg.get_by_role("button", name="Sign out").click()
    pg.get_by_label("API key").wait_for()
    assert pg.evaluate("localStorage.getItem('mm-api-key')") is None
    context.close()


def test_submit_from_the_form_and_watch_the_progress_bar(page: Any, server: Server, shots: Path | None) -> None:
    page.goto(server.url + "/")
    page.get_by_role("heading", name="New quantization job").wait_for()
    page.evaluate("window.__sameDocument = true")
    submit_tiny_job(page)
    page.locator(".form-status a").wait_for()
    job_id = page.locator(".form-status a").inner_text()
    assert job_id == newest_job(server)
    row = page.locator(f'li.job[data-job-id="{job_id}"]')
    seen: list[tuple[float, float, str]] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    shot_taken = False
    while time.monotonic() < deadline:
        value, top, status = row.evaluate("r => [r.querySelector('progress').value, r.querySelector('progress').max, r.querySelector('.status').textContent]")
        seen.append((value, top, status))
        if status == "succeeded":
            break
        if not shot_taken and status == "running" and value >= 8:
            screenshot(page, shots, "jobs")
            shot_taken = True
        time.sleep(0.25)
    assert seen[-1][2] == "succeeded", (seen[-10:], server.log_tail())
    running = [v for v, top, status in seen if status == "running" and top == N_BLOCKS]
    assert running == sorted(running), running  # the bar only moves forward
    assert len(set(running)) >= 5 and min(running) < N_BLOCKS / 2, running  # seen moving, live, not just at the end
    assert seen[-1][0] == seen[-1][1] == 1  # full once done
    assert page.evaluate("window.__sameDocument") is True  # all of it without a reload
    assert server.job(job_id)["status"] == "succeeded"
    server.shared_job = job_id


def test_job_page_shows_the_chart_size_and_downloads(page: Any, server: Server, shots: Path | None) -> None:
    job = server.job(server.shared_job)
    page.goto(server.url + "/")
    page.locator(f'a[href="#/jobs/{job["id"]}"]').first.click()
    page.locator("#job-status").filter(has_text="succeeded").wait_for()
    page.locator("svg.chart").wait_for()
    assert page.locator("svg.chart g.block").count() == N_BLOCKS
    assert page.locator("svg.chart rect.bar-awq").count() == N_BLOCKS
    assert page.locator("svg.chart rect.bar-rtn").count() == N_BLOCKS
    stats = server.http.get(f"/v1/quantization/jobs/{job['id']}/result", params={"file": "quant_stats.json"}).json()
    first = stats["blocks"][0]
    title = page.locator("svg.chart g.block").first.locator("rect.bar-awq title").inner_html()
    assert title.startswith("block 0: AWQ ") and abs(float(title.split()[-1]) / first["block_output_error"] - 1) < 0.01
    total_mb = sum(f["bytes"] for f in job["result_files"]) / 1e6
    assert f"{total_mb:.1f} MB in {len(job['result_files'])} files" in page.locator(".result-size").inner_text()
    assert page.get_by_role("button", name="Cancel job").count() == 0  # hidden once finished
    events = page.locator("ol.events li")
    assert events.first.get_attribute("data-type") == "created" and events.last.get_attribute("data-type") == "succeeded"
    for fmt in ("mlx", "autoawq"):
        link = page.locator(f'.downloads a[data-format="{fmt}"][href*="file=model.safetensors"]')
        href = link.get_attribute("href")
        with server.http.stream("GET", href) as resp:
            assert resp.status_code == 200 and int(resp.headers["content-length"]) > 10_000_000
    # with a key, the link fetches the file with the bearer token and saves it
    with page.expect_download() as download:
        page.locator('.downloads a[data-format="mlx"][href$="file=config.json"]').click()
    assert download.value.suggested_filename == f"{job['id']}-config.json"
    screenshot(page, shots, "job", down_to=".chart-figure figcaption")


def test_serve_and_chat_streams_from_the_result(page: Any, server: Server, shots: Path | None) -> None:
    job_id = server.shared_job
    page.goto(f"{server.url}/#/jobs/{job_id}")
    page.get_by_role("link", name="Serve and chat").click()
    model = page.get_by_label("Model", exact=True)
    # The select shows the wanted model at once and the served list when /v1/models answers.
    sync_api.expect(model.locator(f"option[value={BUILTIN!r}]")).to_have_count(1)
    page.wait_for_function(f"document.querySelector('#chat-model').value === {job_id!r}")
    assert job_id in model.locator("option").all_inner_texts() and BUILTIN in model.locator("option").all_inner_texts()
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("16")
    page.evaluate(
        """() => {
          window.__lengths = [];
          new MutationObserver(() => {
            const last = [...document.querySelectorAll('.msg-assistant .msg-text')].pop();
            if (last) window.__lengths.push(last.textContent.length);
          }).observe(document.querySelector('.messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_label("Message").press("Enter")
    page.wait_for_function("/tokens\\/s/.test(document.querySelector('#chat-speed').textContent)", timeout=120_000)
    sync_api.expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=120_000)
    speed = page.locator("#chat-speed").inner_text()
    match = re.match(r"(\d+) tokens · ([\d.]+) tokens/s · first token after [\d.]+ s", speed)
    assert match and int(match.group(1)) >= 2 and float(match.group(2)) > 0, speed
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    answer = page.locator(".msg-assistant .msg-text").last.inner_text()
    assert lengths == sorted(lengths) and len(set(lengths)) >= 3, (lengths, answer, speed)  # text arrived piece by piece
    assert answer.strip() and len(answer) == lengths[-1]
    assert page.locator(".msg-user .msg-text").inner_text() == "What is the capital of France?"
    screenshot(page, shots, "chat")


def test_cancel_a_running_job_from_its_page(page: Any, server: Server) -> None:
    page.goto(server.url + "/")
    page.get_by_role("heading", name="New quantization job").wait_for()
    submit_tiny_job(page)
    page.locator(".form-status a").wait_for()
    job_id = page.locator(".form-status a").inner_text()
    page.locator(".form-status a").click()
    page.locator("#job-status").filter(has_text="running").wait_for(timeout=60_000)
    page.get_by_role("button", name="Cancel job").click()
    page.locator("#job-status").filter(has_text="cancelled").wait_for(timeout=60_000)
    assert page.get_by_role("button", name="Cancel job").count() == 0
    assert page.locator("ol.events li").last.get_attribute("data-type") == "cancelled"
    assert page.locator("svg.chart").count() == 0
    assert server.job(job_id)["status"] == "cancelled"


def test_an_upload_goes_to_the_files_api_and_its_error_is_shown(page: Any, server: Server, tmp_path: Path) -> None:
    """The "Upload a .gguf file" choice sends the file with the key; a file that is no GGUF is
    refused by the API, and the page says why instead of submitting a job."""
    fake = tmp_path / "not-a-model.gguf"
    fake.write_bytes(b"this is not a GGUF file")
    jobs_before = server.http.get("/v1/quantization/jobs").json()["data"]
    page.goto(server.url + "/")
    page.get_by_label("Model", exact=True).select_option(label="Upload a .gguf file…")
    page.get_by_label("Model file (.gguf)").set_input_files(str(fake))
    page.get_by_role("button", name="Quantize").click()
    alert = page.locator(".submit .error")
    sync_api.expect(alert).to_contain_text("GGUF magic", timeout=30_000)
    assert server.http.get("/v1/quantization/jobs").json()["data"] == jobs_before


def test_pages_fit_400px_label_every_field_and_work_from_the_keyboard(page: Any, server: Server) -> None:
    page.set_viewport_size({"width": 400, "height": 800})
    for route in ("#/", f"#/jobs/{server.shared_job}", "#/chat"):
        page.goto(f"{server.url}/{route}")
        page.locator("#view h1").wait_for()
        page.wait_for_timeout(500)  # let the view's data arrive
        assert page.evaluate("document.documentElement.scrollWidth") <= 400, route
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, progress')]
                 .filter(e => e.offsetParent !== null && e.labels.length === 0 && !e.getAttribute('aria-label'))
                 .map(e => e.outerHTML)"""
        )
        assert unlabelled == [], (route, unlabelled)
    # Tab from the top reaches every control of the submit form, in order, then its button
    page.goto(server.url + "/")
    page.get_by_role("heading", name="New quantization job").wait_for()
    reached = []
    for _ in range(25):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
        if reached[-1] == "Quantize":
            break
    expected = ["model", "bits", "group-size", "method", "salient-ratio", "n-samples", "seq-len", "export-autoawq", "Quantize"]
    assert [r for r in reached if r in expected] == expected, reached
