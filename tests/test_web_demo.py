"""The web demo: requests are checked with one-line messages; its samples are generate_samples.py's
for the same seeds and settings (reranked: in the same order); and the page itself, driven by a
real headless Chromium, shows those images, serves 20 concurrent requests and shows bad input as a
message while it keeps serving."""
import glob
import io
import os
import urllib.request

import numpy as np
import pytest
from PIL import Image

import generate_samples
from generation_toy import make_checkpoint
from megatron_t2i.generation.config import LoadConfig
from megatron_t2i.generation.loading import build_context
from megatron_t2i.generation.web_demo import DemoLimits, Request, check, draw

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_tokenizers):
    root = tmp_path_factory.mktemp("demo")
    ckpt = make_checkpoint(str(root / "ckpt"), toy_tokenizers)
    return {"root": root, "ckpt": ckpt, "ctx": build_context(LoadConfig(ckpt, device="cpu"))}


def pixels(files) -> list[np.ndarray]:
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def script_images(ckpt: str, folder, prompt: str, *flags: str) -> list[np.ndarray]:
    """The PNGs of ./scripts/text2image.sh (generate_samples.py) for one query, in file order."""
    os.makedirs(folder)
    queries = os.path.join(folder, "queries.txt")
    with open(queries, "w", encoding="utf-8") as f:
        f.write(prompt + "\n")
    out = os.path.join(folder, "out")
    assert generate_samples.main(["--load", ckpt, "--input-source", queries, "--output-path", out,
                                  "--device", "cpu", *flags]) == 0
    return pixels(sorted(glob.glob(os.path.join(out, "*", "*.png"))))


def test_the_demo_draws_what_the_script_draws_for_the_same_seeds(toy, tmp_path):
    request = Request(PROMPT, samples=3, seed=7, temperature=0.9, top_k=50, cfg_scale=1.5)
    shown = draw(toy["ctx"], request, str(tmp_path / "demo"), max_inference_batch_size=2)
    want = script_images(toy["ckpt"], tmp_path / "script", PROMPT, "--batch-size", "3",
                         "--seed", "7", "--temperature", "0.9", "--top-k", "50",
                         "--cfg-scale", "1.5")
    got = pixels(path for path, _ in shown)
    assert len(got) == len(want) == 3 and not np.array_equal(got[0], got[1])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert [label for _, label in shown] == [f"sample {k} of seed 7" for k in range(3)]


def test_reranked_samples_come_in_the_scripts_order(toy, tmp_path):
    request = Request(PROMPT, samples=4, seed=3, rerank="caption")
    shown = draw(toy["ctx"], request, str(tmp_path / "demo"))
    want = script_images(toy["ckpt"], tmp_path / "script", PROMPT, "--batch-size", "4",
                         "--seed", "3", "--rerank-top", "4", "--rerank", "caption")
    for a, b in zip(pixels(path for path, _ in shown), want):
        np.testing.assert_array_equal(a, b)
    scores = [float(label.rsplit(" ", 1)[1]) for _, label in shown]
    assert scores == sorted(scores, reverse=True) and shown[0][1].startswith("#1: sample ")
    unranked = draw(toy["ctx"], Request(PROMPT, samples=4, seed=3), str(tmp_path / "plain"))
    assert {a.tobytes() for a in pixels(p for p, _ in unranked)} == \
        {a.tobytes() for a in pixels(p for p, _ in shown)}  # the same samples, reordered


@pytest.mark.parametrize("changes, message", [
    ({"prompt": "   "}, "the prompt is empty"),
    ({"prompt": "x" * 501}, "the prompt has 501 characters; at most 500"),
    ({"samples": 0}, "samples: 0; between 1 and 16"),
    ({"samples": 17}, "samples: 17; between 1 and 16"),
    ({"generator": "clip2image"}, "toy has no generator 'clip2image'; it has text2image"),
    ({"rerank": "clip"}, "toy has no CLIP to rerank by"),
    ({"temperature": 0.0}, "temperature must be positive"),
    ({"top_p": 1.0}, "top_p must be in"),
])
def test_bad_requests_are_one_line_messages(toy, changes, message):
    request = Request(**{"prompt": PROMPT, **changes})
    with pytest.raises(ValueError, match=message) as e:
        check(request, toy["ctx"], DemoLimits(), "toy")
    assert "\n" not in str(e.value)


# ---- in a real browser -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    from tools.web_demo_browser import free_port, start_demo

    folder = str(tmp_path_factory.mktemp("server"))
    proc, url = start_demo([toy["ckpt"]], free_port(), folder, "--device", "cpu",
                           "--concurrency", "2", "--max-samples", "8")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from tools.web_demo_browser import chromium

    driver = chromium()
    yield driver
    driver.quit()


def fetch_image(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(url, timeout=30).read()))
                      .convert("RGB"))


@pytest.mark.slow
def test_a_browser_sees_the_scripts_images_and_bad_input_as_a_message(toy, server, browser,
                                                                       tmp_path):
    from tools.web_demo_browser import generate_in_page

    sources, status = generate_in_page(browser, server, PROMPT, samples=3, seed=11)
    assert "3 samples by text2image, seed 11" in status, status
    want = script_images(toy["ckpt"], tmp_path / "script", PROMPT, "--batch-size", "3",
                         "--seed", "11")
    got = [fetch_image(src) for src in sources[:3]]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    links = browser.find_elements("css selector", "#files a")
    assert len({a.get_attribute("href") for a in links}) >= 3  # the PNGs to download
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert Image.open(tmp_path / "page.png").size[0] > 0

    sources, status = generate_in_page(browser, server, "   ", samples=3, seed=11)
    assert sources == [] and status == "Error: the prompt is empty: type a caption (English or " \
                                       "Chinese)", status
    sources, status = generate_in_page(browser, server, PROMPT, samples=2, seed=12)
    assert len(sources) >= 2  # still serving


@pytest.mark.slow
def test_twenty_concurrent_requests_all_complete(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    args = lambda seed: (PROMPT, "ckpt", "text2image", "(none)", 2, seed, 1.0, 200, 0.0, 0.0,
                         "none")
    jobs = [client.submit(*args(seed), api_name="/generate") for seed in range(20)]
    results = [job.result(timeout=600) for job in jobs]  # they queue and draw two at a time
    for seed, (gallery, _, files, status) in enumerate(results):
        assert len(gallery) == 2 and len(files) == 2, status
        assert f"2 samples by text2image, seed {seed}" in status
