"""The page of ``streampress serve`` in a real browser: headless Chromium (Debian's
``chromium`` and ``chromium-driver``, driven by selenium) with a fake camera that plays a
synthetic clip opens ``/``, streams the camera over the Realtime WebSocket, asks a question
and the test reads the streamed answer from the page. Loopback only; bounded in time.

Skipped, with the reason, where selenium, Chromium or ChromeDriver is missing (``.ci/run``
installs them). A screenshot of the page is kept under the test's tmp dir and, when
``$STREAMPRESS_ARTIFACTS`` is set, copied there.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHROMIUM = os.environ.get("STREAMPRESS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("STREAMPRESS_CHROMEDRIVER", "/usr/bin/chromedriver")
TINY = "random:qwen2.5-vl-tiny"
KEY = "browser-test-key"
DEADLINE = 60  # seconds for one test (each takes under 10 s when the machine is free)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ModuleNotFoundError:
        return "selenium is not installed (pip install 'streampress[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing: apt-get install chromium chromium-driver (Debian package {package})"
    return None


pytestmark = [pytest.mark.skipif(_missing() is not None, reason=str(_missing())),
              pytest.mark.slow]  # a real browser (~12 s): run by .ci/run's slow step


@pytest.fixture(autouse=True)
def _deadline():
    def expired(*_):
        raise TimeoutError(f"the browser test took longer than {DEADLINE} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(DEADLINE)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def write_y4m(path: Path, n: int = 30, width: int = 320, height: int = 240, fps: int = 10) -> Path:
    """A fake-camera clip: a gradient with a moving square, as yuv4mpeg (raw yuv420p frames)."""
    import av

    y, x = np.mgrid[0:height, 0:width]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(n):
            rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], -1).astype(np.uint8)
            left = 20 + (i * 8) % (width - 80)
            rgb[90:150, left:left + 60] = (240, 200, 40)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(width=width, height=height,
                                                                             format="yuv420p")
            f.write(b"FRAME\n")
            f.write(frame.to_ndarray().tobytes())  # Y plane, then U, then V (shape [H * 3 / 2, W])
    return path


def write_webm(path: Path, n: int = 30, width: int = 320, height: int = 240, fps: int = 10) -> Path:
    """A video file for the page's file picker: a red square moving over blue (VP8 in WebM)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 2] = 120
            left = (i * 8) % (width - 80)
            rgb[80:160, left:left + 80] = (250, 60, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def server():
    import torch

    import streampress
    from streampress.serve import Engine, StreamSettings, create_app
    from streampress.serve.server import BackgroundServer

    torch.set_num_threads(1)
    model = streampress.load_model(TINY)

    class Recording(Engine):
        """Keeps every answer the server sends (its ``done`` result)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sent = []

        def ask(self, s, question, emit, *args, **kwargs):
            def recording(kind, data):
                if kind == "done":
                    self.sent.append(data)
                emit(kind, data)

            return super().ask(s, question, recording, *args, **kwargs)

    engine = Recording(model, StreamSettings(fps=2, max_new_tokens=16), model_name=TINY)
    with BackgroundServer(create_app(engine, api_key=KEY)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("browser")
    clip = write_y4m(tmp / "clip.y4m")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,900",
                 "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={clip}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(15)
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()


def page_state(driver, expr: str):
    return driver.execute_script(f"return window.streampressPage.{expr}")


def ingested(driver) -> int:
    from selenium.webdriver.common.by import By

    return int(driver.find_element(By.ID, "stat-ingested").text.replace(",", "") or 0)


def open_page(driver, server):
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/")
    assert driver.title.startswith("streampress")
    driver.find_element(By.ID, "api-key").send_keys(KEY)  # the socket's subprotocol, and Bearer for the stats


def ask_and_check(driver, server, wait, question: str, min_frames: int) -> str:
    """Ask on the page; the answer the page shows is the one the server sent."""
    from selenium.webdriver.common.by import By

    n = len(server.engine.sent)
    answers = page_state(driver, "answers.length")
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "ask").click()
    wait.until(lambda d: page_state(d, "answers.length") > answers, "no answer on the page")
    shown = driver.find_elements(By.CSS_SELECTOR, "#answers .a .text")[-1].get_attribute("textContent")
    done = page_state(driver, f"answers[{answers}]")
    assert len(server.engine.sent) == n + 1
    sent = server.engine.sent[-1]
    assert sent["status"] in ("completed", "incomplete") and done["status"] == sent["status"]
    assert shown, "the page shows an empty answer"
    assert shown == done["text"] == sent["text"], (shown, sent["text"])
    assert done["streampress"]["token_ids"] == sent["token_ids"]
    assert done["streampress"]["frames"] >= min_frames
    assert page_state(driver, "errors.length") == 0, page_state(driver, "errors")
    return shown


def stop_stream(driver, server, wait):
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: server.engine.count() == 0, "the stream was not closed after Stop")


def test_page_streams_the_camera_and_shows_the_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    wait = WebDriverWait(browser, 25, poll_frequency=0.1)
    open_page(browser, server)
    browser.find_element(By.ID, "start").click()  # the camera: Chromium's fake device plays the clip
    wait.until(lambda d: page_state(d, "live"), "the page did not connect")
    wait.until(lambda d: ingested(d) >= 4, "no frames were ingested")  # as the page shows them
    stream = server.engine.get(page_state(browser, "streamId"))
    assert stream.settings.method == "streaming_assistant" and stream.settings.keep_ratio == 0.25  # the controls
    assert stream.settings.fps == 2 and stream.settings.max_new_tokens == 32
    assert stream.counts["ingested"] >= 4 and stream.counts["rejected"] == 0 and stream.counts["skipped"] == 0
    assert stream.frame_hw == (240, 320)  # the camera's 320x240, sent at the page's 320 px

    ask_and_check(browser, server, wait, "What is moving in the video?", min_frames=4)
    time.sleep(1.2)  # one more statistics poll, for the screenshot
    assert browser.find_element(By.ID, "stat-ttft").text not in ("", "–")
    assert browser.find_element(By.ID, "stat-kept").text not in ("", "–")
    shot = tmp_path / "streampress-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("STREAMPRESS_ARTIFACTS"):
        out = Path(os.environ["STREAMPRESS_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)

    severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
    stop_stream(browser, server, wait)
    assert time.monotonic() - started < DEADLINE


def test_page_streams_a_video_file_with_other_settings(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 25, poll_frequency=0.1)
    video = write_webm(tmp_path / "clip.webm")
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "input[name=source][value=file]").find_element(By.XPATH, "..").click()
    browser.find_element(By.ID, "file").send_keys(str(video))
    wait.until(lambda d: d.find_element(By.ID, "file-name").text == "clip.webm")
    fps = browser.find_element(By.ID, "fps")
    fps.clear()
    fps.send_keys("4")
    Select(browser.find_element(By.ID, "method")).select_by_value("none")
    Select(browser.find_element(By.ID, "size")).select_by_value("224")
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: ingested(d) >= 12, "no frames were ingested")  # 3 s of a 3 s clip: it loops
    stream = server.engine.get(page_state(browser, "streamId"))
    assert stream.settings.method == "none" and stream.settings.fps == 4
    assert stream.frame_hw == (168, 224) and stream.counts["rejected"] == 0
    ask_and_check(browser, server, wait, "What colour is the square?", min_frames=12)
    assert not [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    stop_stream(browser, server, wait)
