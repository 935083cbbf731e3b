"""Drive the running playground in headless Chromium, as a person would: type a conversation, ask for k responses,
read them. tests/test_demo_app.py uses it, and it takes the README's screenshot:

    python demo/browser.py --model outputs/dior-cvae-dailydialog-sample --screenshot docs/demo_app.png

Needs Debian's `chromium` and `chromium-driver` (or CHROMIUM / CHROMEDRIVER naming the binaries) and selenium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def chromium_paths() -> tuple[str | None, str | None]:
    """(browser, driver) executables, or None where absent."""
    browser = shutil.which(os.environ.get("CHROMIUM", "chromium")) or shutil.which("chromium-browser")
    driver = shutil.which(os.environ.get("CHROMEDRIVER", "chromedriver"))
    return browser, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, port: int, log_path: Path, timeout: float = 300) -> subprocess.Popen:
    """`python demo/app.py --model M --port P` in the background, returned once it answers HTTP."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, str(APP), "--model", str(model), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                return process
        except OSError:
            time.sleep(1)
    process.terminate()
    raise RuntimeError(f"the app did not answer within {timeout} s:\n{log_path.read_text()[-3000:]}")


def open_browser(width: int = 1400, height: int = 1250):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def set_text(driver, selector: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", selector)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.TAB)  # Gradio takes the value on blur


def ask(driver, url: str, turns: list[str], k: int, seed: int | None = None, timeout: float = 300) -> list[dict]:
    """Open the app, type the conversation (one turn per line), choose k responses (and a seed), press Generate;
    returns the k response cards as {"label", "text"}."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements("css selector", "#conversation textarea"))
    box = driver.find_element("css selector", "#conversation textarea")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys("\n".join(turns))  # a newline is the Enter key: in a multi-line box, a new line
    set_text(driver, "#count input[type=number]", str(k))
    if seed is not None:
        set_text(driver, "#seed input", str(seed))
    driver.find_element("css selector", "#generate").click()
    wait.until(lambda d: len(d.find_elements("css selector", "#responses .dior-response")) == k)
    return [{"label": card.get_attribute("data-label"),
             "text": card.find_element("css selector", ".dior-text").text}
            for card in driver.find_elements("css selector", "#responses .dior-response")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--screenshot", required=True, help="PNG to write")
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    port = free_port()
    app = start_app(args.model, port, Path(args.screenshot).with_suffix(".log"))
    driver = open_browser()
    try:
        turns = ["Hi , how are you doing today ?", "Not bad . I just got back from the gym ."]
        for card in ask(driver, f"http://127.0.0.1:{port}/", turns, args.k, args.seed):
            print(f"latent seed {card['label']}: {card['text']}")
        # show the prior and decoding settings too
        driver.find_element("xpath", "//*[normalize-space(text())='Prior and decoding']").click()
        time.sleep(1)  # the accordion's opening animation
        driver.save_screenshot(args.screenshot)
    finally:
        driver.quit()
        app.terminate()
        app.wait(30)
        Path(args.screenshot).with_suffix(".log").unlink()


if __name__ == "__main__":
    main()
