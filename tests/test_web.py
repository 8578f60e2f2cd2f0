"""`lmm web` in headless Chromium: upload an image, ask, and the page shows `model.chat`'s answer; a follow-up
question keeps the image in the conversation; Clear empties it."""

import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web extra (gradio) is not installed")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
)
MAX_NEW = 12


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from lmm.testing import saved_tiny_chat_model

    return saved_tiny_chat_model(tmp_path_factory.mktemp("web"), "upload.png")


@pytest.fixture(scope="module")
def page_url(saved, tmp_path_factory):
    _, model_dir, _ = saved
    from lmm.testing import free_port, running_server

    port = free_port()
    log = tmp_path_factory.mktemp("weblog") / "web.log"
    cmd = [
        str(Path(sys.executable).with_name("lmm")),
        "web",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--max-new-tokens",
        str(MAX_NEW),
        "--device",
        "cpu",
    ]
    url = f"http://127.0.0.1:{port}/"
    with running_server(cmd, url, log):
        yield url
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def bot_texts(driver) -> list[str]:
    """The answer bubbles' texts; read again when the page re-renders a bubble while it is being read (the chat
    panel replaces its elements as it streams and when it is cleared)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            bubbles = driver.find_elements(By.CSS_SELECTOR, '#lmm-chat [data-testid="bot"]')
            return [e.get_attribute("innerText").strip() for e in bubbles]
        except StaleElementReferenceException:
            continue
    raise AssertionError("the chat panel kept re-rendering its answer bubbles")


def ask(driver, text: str, n_answers: int, timeout: float = 90) -> str:
    """Type a question, press Enter, wait for the n-th answer bubble to be final (input box enabled again)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.CSS_SELECTOR, "#lmm-input textarea")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, timeout).until(
        lambda d: len(bot_texts(d)) >= n_answers and d.find_element(By.CSS_SELECTOR, "#lmm-input textarea").is_enabled()
    )
    return bot_texts(driver)[n_answers - 1]


def test_upload_ask_follow_up_and_clear(browser, page_url, saved):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, _, image = saved
    with Image.open(image) as im:
        pil = im.convert("RGB")
    turn1 = [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": "what is this?"}]}]
    want1 = model.chat(turn1, max_new_tokens=MAX_NEW)
    turn2 = turn1 + [{"role": "assistant", "content": want1}, {"role": "user", "content": "and the color?"}]
    want2 = model.chat(turn2, max_new_tokens=MAX_NEW)
    assert want1.isalnum() and want2, "pick a model/image whose answer reads the same as markdown"
    text_only = [{"role": "user", "content": "what is this?"}]
    assert want1 != model.chat(text_only, max_new_tokens=MAX_NEW), "the answer should depend on the image"
    assert want2 != model.chat(text_only + turn2[1:], max_new_tokens=MAX_NEW)

    browser.get(page_url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#lmm-input textarea"))
    browser.find_element(By.CSS_SELECTOR, "#lmm-input input[type=file]").send_keys(str(image))
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#lmm-input img"))

    assert ask(browser, "what is this?", 1) == want1
    user_bubbles = browser.find_elements(By.CSS_SELECTOR, '#lmm-chat [data-testid="user"]')
    assert user_bubbles[0].find_elements(By.TAG_NAME, "img"), "the uploaded image is shown in the conversation"
    assert ask(browser, "and the color?", 2) == want2  # the follow-up still sees the first image

    browser.find_element(By.CSS_SELECTOR, "#lmm-clear").click()
    WebDriverWait(browser, 30).until(lambda d: not bot_texts(d))


@pytest.fixture(scope="module")
def media_page(tmp_path_factory):
    """`lmm web` on a tiny model with an audio encoder; an MP4 and a WAV to upload."""
    import numpy as np

    from lmm.data.audio import write_audio
    from lmm.data.video import write_video
    from lmm.testing import free_port, running_server, sine_wave, tiny_media_lmm

    d = tmp_path_factory.mktemp("webmedia")
    rs = np.random.RandomState(2)
    write_video(str(d / "clip.mp4"), [Image.fromarray(rs.randint(0, 255, (32, 32, 3), np.uint8)) for _ in range(6)])
    write_audio(d / "tone.wav", sine_wave(500.0), 16000)
    model = tiny_media_lmm(seed=6)  # its answer to this clip pair reads the same as markdown
    model.save_pretrained(d / "model")
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("lmm")), "web", "--model", str(d / "model"), "--port", str(port)]
    cmd += ["--max-new-tokens", str(MAX_NEW), "--device", "cpu"]
    with running_server(cmd, f"http://127.0.0.1:{port}/", d / "web.log"):
        yield model, f"http://127.0.0.1:{port}/", d / "clip.mp4", d / "tone.wav"
    assert "Traceback" not in (d / "web.log").read_text(), (d / "web.log").read_text()


def test_video_and_audio_uploads(browser, media_page):
    """An MP4 and a WAV uploaded in one message: the page answers what model.chat answers for them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, url, clip, tone = media_page
    parts = [{"type": "video", "video": str(clip)}, {"type": "audio", "audio": str(tone)}]
    want = model.chat(
        [{"role": "user", "content": [*parts, {"type": "text", "text": "what is this?"}]}], max_new_tokens=MAX_NEW
    )
    assert want.isalnum()
    assert want != model.chat([{"role": "user", "content": "what is this?"}], max_new_tokens=MAX_NEW)

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#lmm-input textarea"))
    browser.find_element(By.CSS_SELECTOR, "#lmm-input input[type=file]").send_keys(f"{clip}\n{tone}")
    thumbs = '#lmm-input [aria-label="File thumbnail"]'
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, thumbs)) == 2)
    assert ask(browser, "what is this?", 1) == want
