"""The web playground at /ui, end to end in headless Chromium (Debian's, driven by Playwright) against the
real server on the tiny model: voices, upload, microphone recording, progressive playback, errors, API key.

Needs /usr/bin/chromium (`make browser-deps`); Playwright never downloads a browser here.
Screenshots go to test-output/; `TTS_UPDATE_SCREENSHOT=1` also refreshes docs/ui.png for the README.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import ROOT, ServerProcess, make_clip, wav_info

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",  # the page plays audio without a real user
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",  # a microphone that beeps
]
OUTPUT = ROOT / "test-output"
DOCS_SCREENSHOT = ROOT / "docs" / "ui.png"
# Many sentences: the server caps each at 24 audio tokens, so the stream lasts many chunks.
LONG_TEXT = (
    "Bienvenidos al servicio de voz sin conexión. Escribe un texto y elige una voz. El audio empieza a sonar "
    "enseguida. No hace falta esperar a que termine. Cada frase se genera por separado. Puedes subir tu propia "
    "voz. También puedes grabarla con el micrófono. Elige el idioma y el formato. Después descarga el resultado. "
    "Todo funciona en tu propio equipo."
)
FINISHED = "['playing', 'done', 'error', 'stopped'].includes(window.playground.phase)"


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (make browser-deps)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def ui_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of this module's own: the tests add voices, which must not leak into other modules."""
    srv = ServerProcess(tmp_path_factory.mktemp("ui-server"), tiny_model_dir)
    make_clip(srv.voices_dir / "ana.wav", seconds=6, freq=220, rate=16000, channels=1)
    make_clip(srv.voices_dir / "my_voice_sample.mp3", seconds=6)
    srv.start()
    yield srv
    srv.stop()


class Page:
    """A fresh browser context (own localStorage) on the playground, collecting script errors."""

    def __init__(self, browser: sync_api.Browser, base_url: str):
        self.context = browser.new_context(viewport={"width": 900, "height": 1000}, color_scheme="light",
                                           accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.script_errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.script_errors.append(str(exc)))
        self.base_url = base_url

    def open(self) -> sync_api.Page:
        self.page.goto(self.base_url + "/ui")
        return self.page

    def state(self) -> dict:
        return self.page.evaluate("() => ({...window.playground})")

    def speak(self, text: str, timeout_ms: int = 180_000) -> dict:
        self.page.fill("#text", text)
        self.page.click("#speak")
        self.page.wait_for_function(FINISHED, timeout=timeout_ms)
        return self.state()

    def screenshot(self, name: str) -> Path:
        OUTPUT.mkdir(exist_ok=True)
        path = OUTPUT / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def ui(browser: sync_api.Browser, ui_server: ServerProcess) -> Iterator[Page]:
    page = Page(browser, ui_server.url)
    yield page
    page.context.close()
    assert not page.script_errors, page.script_errors


def voice_names(page: sync_api.Page) -> list[str]:
    return page.eval_on_selector_all("#voice option", "options => options.map(o => o.value)")


def error_text(page: sync_api.Page) -> str:
    page.wait_for_selector("#error", state="visible")
    return page.inner_text("#error")


# ---- the page is served ---------------------------------------------------------------------------
def test_page_and_assets_are_served(ui_server: ServerProcess) -> None:
    with ui_server.client() as client:
        page = client.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<base href="/ui/">' in page.text
        assert client.get("/ui/").status_code == 200
        for name, kind in [("app.js", "javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")]:
            asset = client.get(f"/ui/{name}")
            assert asset.status_code == 200 and kind in asset.headers["content-type"], name
        missing = client.get("/ui/secrets.txt")
        assert missing.status_code == 404 and missing.json()["error"]["message"]
        assert client.get("/").json()["ui"] == "/ui"


def test_page_loads_and_lists_voices(ui: Page) -> None:
    page = ui.open()
    page.wait_for_function("document.querySelector('#model-state').dataset.state === 'ready'")
    page.wait_for_function("document.querySelectorAll('#voice option[value]:not([value=\"\"])').length >= 2")
    assert {"ana", "my_voice_sample"} <= set(voice_names(page))
    assert page.input_value("#language") == "es"
    languages = page.eval_on_selector_all("#language option", "options => options.map(o => o.value)")
    assert len(languages) == 18 and {"en", "zh-cn", "hi", "auto"} <= set(languages)  # 17 + auto (detect)
    formats = page.eval_on_selector_all("#format option", "options => options.map(o => o.value)")
    assert formats == ["wav", "mp3", "opus", "aac", "flac"]
    # Every control has a label (accessibility).
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map(el => el.id)""")
    assert unlabeled == []
    assert page.is_hidden("#error")
    ui.screenshot("ui-loaded")


# ---- upload, speak, progressive playback, download ------------------------------------------------
def test_upload_a_clip_and_speak_with_progressive_playback(ui: Page, tmp_path: Path) -> None:
    page = ui.open()
    page.wait_for_function("document.querySelector('#model-state').dataset.state === 'ready'")
    clip = make_clip(tmp_path / "lucia.mp3", seconds=7, freq=200)
    page.click("#add-voice summary")
    page.fill("#new-name", "lucia")
    page.set_input_files("#files", str(clip))
    page.click("#save-voice")
    page.wait_for_function("document.querySelector('#voice').value === 'lucia'")
    assert "lucia" in voice_names(page)
    assert page.is_hidden("#error")

    state = ui.speak(LONG_TEXT)
    assert state["error"] is None, state
    assert state["mode"] == "pcm" and state["chunks"] > 2, state
    # Playback started before the response ended: the AudioContext clock had already played audio
    # (observed in the page when the last byte arrived), not merely scheduled it.
    assert state["firstAudioMs"] < state["responseEndMs"], state
    assert state["playedAtEndS"] > 0, state
    assert page.inner_text("#m-first") != "–" and page.inner_text("#m-total") != "–"

    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert download.suggested_filename.endswith(".wav")
    rate, channels, frames = wav_info(Path(download.path()).read_bytes())
    assert (rate, channels) == (24000, 1)
    assert frames / rate == pytest.approx(state["audioSeconds"], abs=0.01) and frames > rate
    page.click("#add-voice summary")  # folded again: the screenshot shows the whole flow on one screen
    shot = ui.screenshot("ui-spoken")
    if os.environ.get("TTS_UPDATE_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


@pytest.mark.parametrize("fmt", ["mp3", "flac"])
def test_compressed_formats_play_and_download(ui: Page, fmt: str) -> None:
    page = ui.open()
    page.wait_for_function("document.querySelector('#voice').value !== ''")
    page.select_option("#format", fmt)
    state = ui.speak("Hola. Esta es una prueba corta.")
    assert state["error"] is None, state
    if fmt == "mp3":  # streamed through Media Source Extensions
        assert state["mode"] == "mse", state
    page.wait_for_function("window.playground.firstAudioMs !== null")  # the <audio> element did play
    with page.expect_download() as download_info:
        page.click("#download")
    data = Path(download_info.value.path()).read_bytes()
    assert download_info.value.suggested_filename.endswith(f".{fmt}")
    magic_ok = data[:4] == b"fLaC" if fmt == "flac" else data[0] == 0xFF and data[1] & 0xE0 == 0xE0  # MPEG frame sync
    assert magic_ok, data[:8]


def test_stop_ends_playback_and_the_stream(ui: Page) -> None:
    page = ui.open()
    page.wait_for_function("document.querySelector('#voice').value !== ''")
    page.fill("#text", LONG_TEXT)
    page.click("#speak")
    page.wait_for_function("window.playground.firstAudioMs !== null")
    page.click("#stop")
    page.wait_for_function("window.playground.phase === 'stopped'")
    assert page.inner_text("#speak-status") == "Stopped."
    assert page.is_hidden("#error") and page.is_disabled("#stop")


# ---- microphone -----------------------------------------------------------------------------------
def test_record_a_voice_with_the_microphone(ui: Page) -> None:
    page = ui.open()
    page.wait_for_function("document.querySelector('#voice').value !== ''")
    page.click("#add-voice summary")
    page.click("#record")  # Chromium's fake microphone: a beep every second
    page.wait_for_function("document.querySelector('#record-time').textContent >= '0:03'", timeout=20_000)
    page.click("#record")
    page.wait_for_selector("#record-preview", state="visible")
    page.fill("#new-name", "recorded")
    page.click("#save-voice")
    page.wait_for_function("document.querySelector('#voice').value === 'recorded'")
    assert page.is_hidden("#error"), page.inner_text("#error")
    ui.screenshot("ui-recorded")


# ---- errors ---------------------------------------------------------------------------------------
def test_unknown_voice_shows_the_api_error(ui: Page) -> None:
    page = ui.open()
    page.wait_for_function("document.querySelector('#voice').value !== ''")
    # A voice deleted on the server after the list was loaded.
    page.evaluate("() => { const s = document.querySelector('#voice'); s.add(new Option('ghost', 'ghost')); s.value = 'ghost'; }")
    state = ui.speak("Hola.")
    assert state["phase"] == "error"
    text = error_text(page)
    assert "Unknown voice 'ghost'" in text and "HTTP 404" in text and "POST /api/voices" in text
    ui.screenshot("ui-error")
    page.click("#error-close")
    assert page.is_hidden("#error")


def test_bad_uploads_show_the_api_error(ui: Page, tmp_path: Path) -> None:
    page = ui.open()
    page.wait_for_function("document.querySelector('#voice').value !== ''")
    page.click("#add-voice summary")
    page.fill("#new-name", "shorty")
    page.set_input_files("#files", str(make_clip(tmp_path / "short.wav", seconds=0.5)))
    page.click("#save-voice")
    assert "0.5 s long" in error_text(page) and "HTTP 422" in page.inner_text("#error")
    # An existing name without "replace" is refused; the voice is not changed.
    page.fill("#new-name", "ana")
    page.set_input_files("#files", str(make_clip(tmp_path / "ana2.wav", seconds=6)))
    page.click("#save-voice")
    page.wait_for_function("document.querySelector('#error-hint').textContent.includes('409')")


# ---- API key --------------------------------------------------------------------------------------
KEY = "s3cret-key"


def wait_ready_with_key(srv: ServerProcess, key: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert srv.proc.poll() is None, srv.log()
        try:
            if httpx.get(srv.url + "/", headers={"Authorization": f"Bearer {key}"}, timeout=2).json().get("model") == "ready":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout} s:\n{srv.log()}")


def test_api_key_mode(browser: sync_api.Browser, start_server) -> None:
    srv = start_server({"TTS_API_KEY": KEY}, run=False)
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.start(wait_ready=False)  # its readiness check has no key
    wait_ready_with_key(srv, KEY)
    assert httpx.get(srv.url + "/ui").status_code == 200  # the page itself is public
    assert httpx.get(srv.url + "/api/voices").status_code == 401
    ui = Page(browser, srv.url)
    try:
        page = ui.open()
        assert "needs an API key" in error_text(page) and "HTTP 401" in page.inner_text("#error")
        assert page.inner_text("#model-state") == "API key needed"
        assert page.evaluate("document.activeElement.id") == "api-key"  # the key field is opened and focused

        page.fill("#api-key", "wrong")
        page.click("#key-save")
        page.wait_for_function("document.querySelector('#error-message').textContent.includes('Invalid API key')")

        page.fill("#api-key", KEY)
        page.click("#key-save")
        page.wait_for_function("document.querySelector('#voice').value === 'ana'")
        assert page.is_hidden("#error")
        page.reload()  # the key is remembered in this browser
        page.wait_for_function("document.querySelector('#voice').value === 'ana'")
        state = ui.speak("Hola. Con clave.")
        assert state["error"] is None and state["bytes"] > 44, state
        ui.screenshot("ui-api-key")
        assert not ui.script_errors, ui.script_errors
    finally:
        ui.context.close()
