"""The web UI (valle_jax.webui) in a real headless Chromium driven by Playwright: type text, upload a wav,
press Generate, download the audio and check it; then an error shows as a message in the page.

Chromium is Debian's package (tools/setup_env.sh installs it as it does espeak-ng); Playwright drives it as
installed, so no browser is downloaded. The test skips, saying so, only where no Chromium is installed."""

import shutil
import time
from pathlib import Path

import pytest
import soundfile as sf

from valle_jax.audio import HOP_LENGTH, SAMPLE_RATE
from valle_jax.decoding import Settings

CHROMIUM = next(
    (
        p
        for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
        if p and Path(p).is_file()
    ),
    None,
)
pytestmark = [
    pytest.mark.needs_espeak,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium installed (tools/setup_env.sh installs Debian's "
        "chromium as root; elsewhere: sudo apt-get install -y chromium)",
    ),
]
STEPS = 24


@pytest.fixture(scope="module")
def webui(tiny_tts, tmp_path_factory):
    import portpicker

    from valle_jax.webui import WebUI, warm_up

    tts = tiny_tts
    defaults = Settings(max_ar_steps=STEPS)
    t0 = time.perf_counter()
    warm_up(tts, defaults)
    print(f"warm-up {time.perf_counter() - t0:.1f} s")
    ui = WebUI(tts, out_dir=tmp_path_factory.mktemp("webui_out"))
    port = portpicker.pick_unused_port()
    demo = ui.blocks(defaults)
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, allowed_paths=[str(ui.out_dir)]
    )
    yield f"http://127.0.0.1:{port}"
    demo.close()


def test_generate_in_a_browser_downloads_a_wav_and_errors_show_in_the_page(webui, corpus, tmp_path):
    from playwright.sync_api import sync_playwright

    voice = sorted(corpus.rglob("*.wav"))[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.goto(webui)
        page.locator("#text textarea").fill("Hello there.")
        page.locator("#reference input[type=file]").set_input_files(str(voice))
        page.locator("#reference audio[src]").wait_for(state="attached")  # the upload is in
        t0 = time.perf_counter()
        page.locator("#generate").click()
        audio = page.locator("#output audio[src]")
        audio.wait_for(state="attached", timeout=120_000)
        first_audio = time.perf_counter() - t0
        print(f"first audio {first_audio:.1f} s after Generate")
        body = page.request.get(audio.get_attribute("src")).body()
        (tmp_path / "out.wav").write_bytes(body)
        wav, sr = sf.read(tmp_path / "out.wav")
        assert sr == SAMPLE_RATE and wav.shape == (STEPS * HOP_LENGTH,)
        used = page.locator("#used").inner_text()
        assert "max_ar_steps" in used and str(STEPS) in used and "audio_seconds" in used

        page.locator("#text textarea").fill("   ")
        page.locator("#generate").click()
        toast = page.locator('[data-testid="toast-body"].error [data-testid="toast-text"]')
        toast.wait_for(timeout=30_000)
        assert "empty text" in toast.inner_text() and "Traceback" not in page.content()
        browser.close()
