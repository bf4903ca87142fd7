"""Drive the web demo in a real headless Chromium (Debian's chromium + chromedriver, through
selenium): the suite's browser test uses it, and run as a script it makes the README's screenshot.

    python tools/web_demo_browser.py --load checkpoints/demo --load checkpoints/clip-gen \
        --prompt "a large red circle in the centre on a gray background" --out docs/web_demo.png
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

CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = ("chromedriver",)


def _which(names, where=("/usr/bin", "/usr/lib/chromium")) -> str | None:
    for name in names:
        found = shutil.which(name) or next((os.path.join(d, name) for d in where
                                            if os.path.isfile(os.path.join(d, name))), None)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(loads: list[str], port: int, output_dir: str, *flags: str,
               timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """The demo server as a subprocess, once it answers -> (process, its URL)."""
    cmd = [sys.executable, "-m", "megatron_t2i.cli.web_demo", "--port", str(port),
           "--output-dir", output_dir, *flags]
    for load in loads:
        cmd += ["--load", load]
    log = open(os.path.join(output_dir, "server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo exited ({proc.returncode}): "
                               f"{open(log.name).read()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"the demo did not answer on {url} within {timeout} s")


def chromium(width: int = 1280, height: int = 1150):
    """A headless Chromium under selenium; a one-line error when it is not installed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _which(CHROMIUM), _which(CHROMEDRIVER)
    if not (binary and driver):
        raise RuntimeError("chromium and chromedriver are needed (Debian packages chromium and "
                           "chromium-driver; bash env/install.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _set(driver, css: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(value), Keys.TAB)


def generate_in_page(driver, url: str, prompt: str, samples: int | None = None,
                     seed: int | None = None, compare: str | None = None,
                     timeout: float = 120) -> tuple[list[str], str]:
    """Open the page, fill the form, press Generate, wait for the answer -> (URLs of the images
    in the first gallery, in order; the status line)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    if driver.current_url != url:
        driver.get(url)
    # the page re-renders what it updates: an element found a moment ago may be gone, look again
    wait = WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(ec.presence_of_element_located(("css selector", "#prompt textarea")))
    status = driver.find_element("css selector", "#status")
    before = status.text
    _set(driver, "#prompt textarea", prompt)
    if samples is not None:
        _set(driver, "#samples input[type=number]", samples)
    if seed is not None:
        _set(driver, "#seed input", seed)
    if compare is not None:  # a dropdown: type to filter, Enter picks the match
        from selenium.webdriver.common.keys import Keys
        box = driver.find_element("css selector", "#compare input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(compare, Keys.ENTER)
    driver.find_element("css selector", "#generate").click()
    wait.until(lambda d: d.find_element("css selector", "#status").text not in ("", before))
    text = driver.find_element("css selector", "#status").text
    if text.startswith("Error"):
        return [], text

    def gallery(d):
        found = [img.get_attribute("src")
                 for img in d.find_elements("css selector", "#gallery img")]
        return found if len(found) >= (samples or 1) else None

    return wait.until(gallery), text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="a screenshot of the web demo after one prompt")
    p.add_argument("--load", action="append", required=True)
    p.add_argument("--prompt", default="a large red circle in the centre on a gray background")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--compare", help="the name of the second checkpoint to compare with")
    p.add_argument("--out", default="docs/web_demo.png")
    args = p.parse_args(argv)
    import tempfile
    folder = tempfile.mkdtemp(prefix="web_demo_shot_")
    proc, url = start_demo(args.load, free_port(), folder)
    driver = chromium()
    try:
        generate_in_page(driver, url, args.prompt, args.samples, compare=args.compare,
                         timeout=600)
        time.sleep(1)  # the gallery's thumbnails finish loading
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        proc.terminate()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
