"""The serving stack without Serve: debug model + Engine + Batcher + the FastAPI app on a real uvicorn socket,
driven by the official `openai` client, raw HTTP for the bad requests, and the `otterhd chat` command on stdin.

The Serve-hosted app (the same `create_app`) is tested in test_serve_app.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_support import (  # noqa: E402
    image_bytes,
    make_model_dir,
    offline_answer,
    user_message,
)

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("serve_model"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    """The app on 127.0.0.1:<free port> in a background thread; yields (base_url, service)."""
    from otterhd_ray.serve.app import create_app
    from otterhd_ray.serve.build import build_service
    from otterhd_ray.serve.options import ServeOptions

    opts = ServeOptions(model=str(model_dir), name="otterhd-debug", device="cpu", max_batch_size=8, max_queue=4,
                        max_body_bytes=64 * 1024, max_pixels=200 * 200, default_max_tokens=MAX_TOKENS)
    service = build_service(opts)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    srv.should_exit = True
    thread.join(timeout=10)


def _client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def _post(base: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


@pytest.mark.timeout(300)
def test_openai_client_plain_and_streamed_match_offline_generate(server):
    base, service = server
    client = _client(base)
    assert [m.id for m in client.models.list()] == ["otterhd-debug"]
    img = image_bytes(1)
    messages = user_message("What is in this image?", img)
    plain = client.chat.completions.create(model="otterhd-debug", messages=messages, max_tokens=MAX_TOKENS)
    expected, num_tokens = offline_answer(service.engine.model, service.engine, "What is in this image?", img,
                                          MAX_TOKENS)
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens == num_tokens
    assert plain.usage.prompt_tokens == service.engine.prepare(
        *_prepared_args(service, "What is in this image?", img)).num_prompt_tokens

    stream = client.chat.completions.create(model="otterhd-debug", messages=messages, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == num_tokens and not chunks[-1].choices


@pytest.mark.timeout(300)
def test_stats_report_server_side_timings_of_the_requests_served(server):
    base, _ = server
    with urllib.request.urlopen(f"{base}/stats", timeout=30) as r:
        before = json.loads(r.read())
    client = _client(base)
    messages = user_message("Hi?", image_bytes(2))
    client.chat.completions.create(model="otterhd-debug", messages=messages, max_tokens=3)
    assert list(client.chat.completions.create(model="otterhd-debug", messages=messages, max_tokens=3, stream=True))
    with urllib.request.urlopen(f"{base}/stats?after={before['last']}", timeout=30) as r:
        after = json.loads(r.read())
    assert after["summary"]["requests"] == 2 and after["summary"]["batches"] == 2
    for rec in after["requests"]:
        assert 0 < rec["prepared_s"] <= rec["started_s"] <= rec["first_token_s"] <= rec["finished_s"]
        assert rec["batch_size"] == 1 and 1 <= rec["completion_tokens"] <= 3
    assert after["summary"]["first_token_s"]["p50"] <= after["summary"]["finished_s"]["p50"]


def _prepared_args(service, text, img):
    from otterhd_ray.serve.media import ImagePolicy, prepare_image
    from otterhd_ray.serve.protocol import parse_chat_request

    return parse_chat_request({"messages": user_message(text, img)}), prepare_image(img, ImagePolicy())


@pytest.mark.timeout(300)
def test_prompt_layout_is_the_processors(server, tiny_tokenizer_dir):
    # Single turn = FuyuProcessor.encode_prompt(image, template(q)); history = encode_conversation's layout.
    import io

    from PIL import Image

    from otterhd_ray.data.processor import FuyuProcessor
    from otterhd_ray.serve.protocol import parse_chat_request

    _, service = server
    engine = service.engine
    img = image_bytes(2)
    processor = FuyuProcessor(engine.tokenizer)
    req, prepared_image = _prepared_args(service, "How many dogs?", img)
    ours = engine.prepare(req, prepared_image).input_ids_T.tolist()
    ref = processor.encode_prompt(Image.open(io.BytesIO(img)), "User:How many dogs? Assistant:")["input_ids"]
    assert ours == [int(t) for t in ref]

    history = [*user_message("How many dogs?", img), {"role": "assistant", "content": "two"},
               {"role": "user", "content": "And cats?"}]
    req = parse_chat_request({"messages": history})
    ours = engine.prepare(req, prepared_image).input_ids_T.tolist()
    conv = processor.encode_conversation(Image.open(io.BytesIO(img)), [
        {"role": "user", "text": "How many dogs?"}, {"role": "assistant", "text": "two"}])["input_ids"]
    tail = processor.encode_prompt(Image.new("RGB", (30, 30)), "User:And cats? Assistant:")["input_ids"][3:]
    assert ours == [int(t) for t in conv] + [int(t) for t in tail]


@pytest.mark.timeout(300)
def test_every_bad_request_gets_its_code_and_the_server_keeps_serving(server):
    base, service = server
    good = {"model": "otterhd-debug", "messages": user_message("hi", image_bytes(3)), "max_tokens": 2}
    big_image = image_bytes(4, size=(300, 300))  # 90 000 pixels > the 40 000 cap of this server
    cases = {
        "undecodable image": ({**good, "messages": user_message("hi", b"not an image at all")}, 400),
        "bad base64": ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400),
        "pixel cap": ({**good, "messages": user_message("hi", big_image)}, 413),
        "body cap": ({**good, "messages": user_message("x" * 70_000)}, 413),
        "over the context": ({**good, "max_tokens": 10_000}, 400),
        "unknown role": ({**good, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        "unknown content type": ({**good, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]}, 400),
        "local path not allowed": ({**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400),
        "unknown model": ({**good, "model": "gpt-4"}, 404),
        "not json": (b"{nope", 400),
    }
    for name, (body, code) in cases.items():
        status, _, payload = _post(base, body)
        assert status == code, (name, status, payload)
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (name, error)
    status, _, payload = _post(base, cases["over the context"][0])
    assert "8192" in payload["error"]["message"]  # names the limit
    # still serving
    status, _, payload = _post(base, good)
    assert status == 200 and payload["choices"][0]["message"]["content"] is not None


@pytest.mark.timeout(300)
def test_full_queue_answers_429_with_retry_after(server):
    base, service = server
    batcher = service.batcher
    # Hold the model thread so requests pile up in the queue (max_queue=4 on this server).
    gate = threading.Event()
    blocker = batcher._thread.submit(gate.wait, 60)
    try:
        results: list[tuple[int, dict]] = []

        def call():
            status, headers, _ = _post(base, {"messages": user_message("hi"), "max_tokens": 1})
            results.append((status, headers))

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while sum(1 for s, _ in results if s == 429) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        gate.set()
    for t in threads:
        t.join(timeout=60)
    codes = sorted(s for s, _ in results)
    assert codes.count(429) >= 3 and codes.count(200) >= 4, codes
    assert all(h.get("Retry-After", "").isdigit() for s, h in results if s == 429)
    blocker.result(timeout=5)


@pytest.mark.timeout(300)
def test_api_key(model_dir, monkeypatch):
    import httpx

    from otterhd_ray.serve.app import create_app
    from otterhd_ray.serve.build import build_service
    from otterhd_ray.serve.options import ServeOptions

    key = "test-key-" + "x" * 8
    monkeypatch.setenv("OTTERHD_TEST_KEY", key)
    service = build_service(ServeOptions(model=str(model_dir), device="cpu", api_key_env="OTTERHD_TEST_KEY"))
    app = create_app(service)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {"messages": user_message("hi"), "max_tokens": 1}
            missing = await client.post("/v1/chat/completions", json=body)
            wrong = await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
            models = await client.get("/v1/models")
            right = await client.post("/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {key}"})
            health = await client.get("/health")
            page = await client.get("/")
            stats = await client.get("/stats")
            return missing, wrong, models, right, health, page, stats

    missing, wrong, models, right, health, page, stats = asyncio.run(go())
    assert missing.status_code == wrong.status_code == models.status_code == stats.status_code == 401
    assert key not in missing.text and key not in wrong.text
    assert missing.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200 and health.status_code == 200
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    monkeypatch.delenv("OTTERHD_TEST_KEY")
    with pytest.raises(ValueError, match="OTTERHD_TEST_KEY"):
        ServeOptions(model=str(model_dir), api_key_env="OTTERHD_TEST_KEY").api_key()


@pytest.mark.timeout(300)
def test_chat_command_on_stdin(model_dir, tmp_path):
    # `otterhd chat` as a user runs it: a subprocess reading a script on stdin.
    img = tmp_path / "cat.png"
    img.write_bytes(image_bytes(5))
    script = "What is this?\n/reset\n/image /no/such/file.png\nAgain?\n/quit\n"
    proc = subprocess.run(
        [sys.executable, "-m", "otterhd_ray.cli", "chat", "--model", str(model_dir), "--image", str(img),
         "--device", "cpu", "--max-tokens", "5"],
        input=script, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "(conversation reset)" in lines
    assert any(line.startswith("error: no such image file") for line in lines)
    answers = [line for line in lines if not line.startswith("(") and not line.startswith("error")]
    assert len(answers) == 2 and all(a.strip() for a in answers), proc.stdout


@pytest.mark.timeout(300)
def test_chat_session_streams_and_keeps_history(server, tmp_path):
    # The command's loop in-process (stdin/stdout as StringIO), with the server's engine.
    import io

    from otterhd_ray.serve.chat import ChatSession, run_chat

    _, service = server
    img = tmp_path / "dog.png"
    img.write_bytes(image_bytes(6))
    session = ChatSession(service.engine, max_tokens=4)
    session.set_image(str(img))
    out = io.StringIO()
    assert run_chat(session, io.StringIO("What is this?\nAnd now?\n/bogus\n"), out) == 0
    expected, _ = offline_answer(service.engine.model, service.engine, "What is this?", img.read_bytes(), 4)
    lines = out.getvalue().splitlines()
    assert lines[0].removesuffix(" [max tokens]") == expected
    assert [t.role for t in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1].text == expected
    assert lines[2].startswith("unknown command '/bogus'")


@pytest.mark.timeout(300)
def test_adapter_option_loads_merges_and_refuses_clearly(model_dir, tmp_path):
    import json

    import torch

    from otterhd_ray.models.fuyu import load_hf, lora, peft
    from otterhd_ray.serve.build import load_engine
    from otterhd_ray.serve.options import ServeOptions

    # A non-trivial adapter: random A and B, saved as PEFT files; the served model must answer like base+adapter.
    model = load_hf(model_dir)
    lora.add_lora(model, lora.LoraSpec(r=4, alpha=8.0, dropout=0.0, targets=lora.TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                param.normal_(0, 0.5)
    peft.save_peft_adapter(model, tmp_path / "adapter")
    engine = load_engine(ServeOptions(model=str(model_dir), adapter=str(tmp_path / "adapter"), device="cpu"))
    assert not lora.has_lora(engine.model)  # merged once at load: plain projections while serving
    base = load_engine(ServeOptions(model=str(model_dir), device="cpu"))
    img = image_bytes(7)
    with_adapter, _ = offline_answer(model.eval(), engine, "What is this?", img, 6)  # unmerged adapter path
    served, _ = offline_answer(engine.model, engine, "What is this?", img, 6)
    plain, _ = offline_answer(base.model, base, "What is this?", img, 6)
    assert served == with_adapter and served != plain
    lora.merge(model)
    merged = model.state_dict()
    for k, v in engine.model.state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6, msg=k)

    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        load_engine(ServeOptions(model=str(model_dir), adapter=str(tmp_path), device="cpu"))
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_engine(ServeOptions(model=str(model_dir), adapter=str(tmp_path / "adapter"), device="cpu"))
