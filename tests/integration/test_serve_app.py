"""The real Ray Serve application on a local Ray: the official `openai` client plain and streamed, 16 concurrent
clients each answered with what the offline `generate` gives for its prompt (greedy), every bad request of issue
14 item 2 answered with its code while the app keeps serving, the metrics on Ray's Prometheus endpoint, and the
web page in a real headless Chromium (Selenium), with a screenshot kept under test-artifacts/.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_support import image_bytes, make_model_dir, offline_answer, user_message  # noqa: E402

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("OTTERHD_TEST_ARTIFACTS", ROOT / "test-artifacts"))
MAX_TOKENS = 8
NAME = "otterhd-debug"
SERVE_ARGS = {"name": NAME, "device": "cpu", "max_batch_size": 16, "max_queue": 32, "batch_wait_s": 0.05,
              "max_body_bytes": 256 * 1024, "max_pixels": 200 * 200, "default_max_tokens": MAX_TOKENS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_tokenizer_dir):
    model_dir = make_model_dir(tmp_path_factory.mktemp("serve_app_model"), tiny_tokenizer_dir)
    http_port, metrics_port = _free_port(), _free_port()
    ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        from otterhd_ray.serve.deployment import build_app

        serve.run(build_app({**SERVE_ARGS, "model": str(model_dir)}), name="otterhd", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "the Serve app did not come up"
            time.sleep(0.5)
        yield {"base": base, "model_dir": model_dir, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def oracle(app):
    """The offline engine on this process: same model dir, reference greedy generate."""
    from otterhd_ray.serve.build import load_engine
    from otterhd_ray.serve.options import load_options

    engine = load_engine(load_options({**SERVE_ARGS, "model": str(app["model_dir"])}))
    return lambda text, image: offline_answer(engine.model, engine, text, image, MAX_TOKENS)


def _client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app['base']}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(base: str, body: bytes | dict) -> tuple[int, object, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


@pytest.mark.timeout(600)
def test_openai_client_plain_and_streamed(app, oracle):
    client = _client(app)
    assert [m.id for m in client.models.list()] == [NAME]
    img = image_bytes(10)
    expected, num_tokens = oracle("Describe the image.", img)
    plain = client.chat.completions.create(model=NAME, messages=user_message("Describe the image.", img),
                                           max_tokens=MAX_TOKENS)
    assert plain.choices[0].message.content == expected
    assert plain.usage.completion_tokens == num_tokens and plain.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model=NAME, messages=user_message("Describe the image.", img),
                                            max_tokens=MAX_TOKENS, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


@pytest.mark.timeout(600)
def test_sixteen_concurrent_clients_each_get_the_offline_answer(app, oracle):
    client = _client(app)
    images = [image_bytes(20 + i % 5) for i in range(16)]  # 5 images: several requests share one prefill
    questions = [f"Question {i}: what is in the picture?" for i in range(16)]

    def ask(i):
        kw = {"model": NAME, "messages": user_message(questions[i], images[i]), "max_tokens": MAX_TOKENS}
        if i % 2:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return client.chat.completions.create(**kw).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, answer in enumerate(answers):
        assert answer == oracle(questions[i], images[i])[0], i


@pytest.mark.timeout(600)
def test_bad_requests_get_their_codes_and_the_app_keeps_serving(app):
    base = app["base"]
    good = {"model": NAME, "messages": user_message("hi", image_bytes(30)), "max_tokens": 2}
    cases = {
        "undecodable image": ({**good, "messages": user_message("hi", b"GIF89a but not really")}, 400),
        "pixel cap": ({**good, "messages": user_message("hi", image_bytes(31, size=(300, 300)))}, 413),
        "body cap": ({**good, "messages": user_message("y" * 300_000)}, 413),
        "over the context": ({**good, "max_tokens": 9000}, 400),
        "unknown role": ({**good, "messages": [{"role": "tool", "content": "hi"}]}, 400),
        "unknown content type": ({**good, "messages": [{"role": "user", "content": [{"type": "file"}]}]}, 400),
        "not json": (b"\xff\xfe", 400),
    }
    for name, (body, code) in cases.items():
        status, _, payload = _post(base, body)
        assert status == code, (name, status, payload)
        assert payload["error"]["message"] and payload["error"]["type"], name
    assert _post(base, good)[0] == 200
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.timeout(600)
def test_metrics_reach_rays_prometheus_endpoint(app):
    wanted = {"ray_otterhd_serve_requests_total", "ray_otterhd_serve_errors_total", "ray_otterhd_serve_tokens_total",
              "ray_otterhd_serve_queue_depth", "ray_otterhd_serve_ttft_s_bucket", "ray_otterhd_serve_batch_size_count"}
    _post(app["base"], {"model": NAME, "messages": user_message("hi"), "max_tokens": 2})
    _post(app["base"], {"model": "nope", "messages": user_message("hi")})
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while not wanted <= seen and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(app["metrics"], timeout=10) as r:
                text = r.read().decode()
            seen = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_otterhd")}
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    assert wanted <= seen, f"missing {wanted - seen}; seen {sorted(seen)}"


# ------------------------------------------------------------------------------------------------ browser
def _chromium() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return browser, driver


@pytest.mark.timeout(600)
def test_web_page_streams_an_answer_in_headless_chromium(app, tmp_path):
    browser, driver = _chromium()
    if browser is None or driver is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI needs Debian's chromium + chromium-driver (make test installs them)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    img = tmp_path / "photo.png"
    img.write_bytes(image_bytes(40, size=(120, 90)))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,900"):
        options.add_argument(flag)
    drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    try:
        drv.set_page_load_timeout(60)
        drv.get(app["base"] + "/")
        WebDriverWait(drv, 30).until(lambda d: d.find_element(By.ID, "model").text == NAME)
        drv.find_element(By.ID, "image").send_keys(str(img))
        WebDriverWait(drv, 30).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        question = drv.find_element(By.ID, "question")
        question.clear()
        question.send_keys("What is in this image?")
        drv.find_element(By.ID, "submit").click()
        WebDriverWait(drv, 120).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "failed")))
        status = drv.find_element(By.ID, "status").text
        answer = drv.find_element(By.ID, "answer").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(ARTIFACTS / "serve_web_page.png"))
    finally:
        drv.quit()
    assert status.startswith("done"), (status, answer)
    assert answer.strip(), "no streamed answer appeared on the page"
