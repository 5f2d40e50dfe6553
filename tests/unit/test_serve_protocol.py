"""Request validation, response shapes, the streaming text decoder, image limits and serving options."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from otterhd_ray.serve.engine import RowDecoder, group_by_image
from otterhd_ray.serve.media import ImagePolicy, prepare_image, read_image_url
from otterhd_ray.serve.options import ServeOptions, load_options
from otterhd_ray.serve.protocol import APIError, chunk, completion, parse_chat_request


def _png(w: int = 60, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _body(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


def test_parse_a_full_request():
    req = parse_chat_request({
        "model": "m", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n", "END"],
        "stream": True, "stream_options": {"include_usage": True}, "user": "ignored",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}},
                                         {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": "sure?"},
        ],
    })
    assert [(t.role, t.text) for t in req.turns] == [("system", "be brief"), ("user", "what?"),
                                                     ("assistant", "a cat"), ("user", "sure?")]
    assert req.image_url == "data:x" and req.max_tokens == 7 and req.stop == ("\n", "END")
    assert (req.temperature, req.top_p, req.seed, req.stream, req.include_usage) == (0.5, 0.9, 3, True, True)
    assert parse_chat_request(_body(max_completion_tokens=4, max_tokens=9)).max_tokens == 4
    assert parse_chat_request(_body(stop="x")).stop == ("x",)


@pytest.mark.parametrize("body, param", [
    ("not an object", None),
    (_body(messages=[]), "messages"),
    (_body(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (_body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "messages[0].content[0].type"),
    (_body(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]), "messages[0].content[0].text"),
    (_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0].image_url.url"),
    (_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a"}},
                                                  {"type": "image_url", "image_url": {"url": "b"}}]}]),
     "messages[0].content[1]"),
    (_body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "a"}}]}, {"role": "user", "content": "b"}]),
     "messages[1].content[0]"),
    (_body(messages=[{"role": "assistant", "content": "a"}]), "messages"),
    (_body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), "messages[1].role"),
    (_body(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]), "messages"),
    (_body(max_tokens=0), "max_tokens"),
    (_body(max_tokens="9"), "max_tokens"),
    (_body(temperature=3), "temperature"),
    (_body(top_p=True), "top_p"),
    (_body(stop=["a"] * 5), "stop"),
    (_body(stop=[""]), "stop"),
    (_body(stream="yes"), "stream"),
    (_body(n=2), "n"),
    (_body(tools=[]), "tools"),
])
def test_bad_requests_are_400_naming_the_field(body, param):
    with pytest.raises(APIError) as err:
        parse_chat_request(body)
    assert err.value.status == 400 and err.value.param == param
    shape = err.value.body()["error"]
    assert set(shape) == {"message", "type", "param", "code"} and shape["type"] == "invalid_request_error"


def test_response_shapes():
    req = parse_chat_request(_body())
    full = completion(req, "m", "hello", "stop", 10, 2)
    assert full["object"] == "chat.completion" and full["choices"][0]["message"] == {"role": "assistant",
                                                                                     "content": "hello"}
    assert full["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    part = chunk(req, "m", {"content": "he"})
    assert part["object"] == "chat.completion.chunk" and part["choices"][0]["delta"] == {"content": "he"}
    assert chunk(req, "m", {}, usage_counts={"x": 1}, choices=False)["choices"] == []


# ------------------------------------------------------------------------------------------- row decoder
def _decoder(stop_strings=(), max_tokens=50, byte_ids=frozenset()):
    vocab = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\n", 7: "<b>"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    return RowDecoder(decode, frozenset({0}), tuple(stop_strings), max_tokens, frozenset(byte_ids))


def test_row_decoder_streams_and_stops_on_ids_and_length():
    row = _decoder()
    assert [row.push(t) for t in (1, 2, 3)] == ["Hel", "lo", " wor"]
    assert row.push(0) == "" and row.finish_reason == "stop" and row.num_tokens == 4
    row = _decoder(max_tokens=2)
    assert row.push(1) + row.push(2) == "Hello" and row.finish_reason == "length"


def test_row_decoder_stop_string_across_tokens_is_held_back_and_cut():
    row = _decoder(stop_strings=["lo wo"])
    out = [row.push(t) for t in (1, 2)]
    assert out == ["He", "l"]  # a tail that may begin the stop string ("l", then "lo") is held
    assert row.push(3) == "" and row.finish_reason == "stop" and row.sent == "Hel"
    row = _decoder(stop_strings=["lo!"])
    assert "".join(row.push(t) for t in (1, 2, 3, 4)) == "Hello world" and row.finish_reason is None


def test_row_decoder_holds_byte_runs_until_they_end():
    row = _decoder(byte_ids={7})
    assert row.push(1) == "Hel" and row.push(7) == "" and row.push(7) == ""
    assert row.push(2) == "<b><b>lo"


def test_group_by_image_keeps_first_seen_order():
    items = ["a1", "b1", "a2", "c1", "b2"]
    assert group_by_image(items, lambda s: s[0]) == ["a1", "a2", "b1", "b2", "c1"]


# ----------------------------------------------------------------------------------------------- images
def test_image_sources_and_limits(tmp_path):
    png = _png()
    policy = ImagePolicy(max_image_bytes=len(png) + 10, max_pixels=60 * 40)
    assert read_image_url(_url(png), policy) == png
    image = prepare_image(png, policy)
    assert image.patches_PC.shape == (2 * 2, 2700) and image.grid == (2, 2)
    assert prepare_image(png, policy).digest == image.digest != prepare_image(_png(90, 40), ImagePolicy()).digest
    with pytest.raises(APIError) as err:
        prepare_image(_png(61, 40), policy)
    assert err.value.status == 413
    with pytest.raises(APIError) as err:
        read_image_url(_url(png + b"x" * 100), policy)
    assert err.value.status == 413
    for bad in ("data:image/png;base64,!!!", "data:text/plain,hello", "ftp://x/y.png", "/etc/hosts"):
        with pytest.raises(APIError) as err:
            read_image_url(bad, policy)
        assert err.value.status == 400, bad
    with pytest.raises(APIError) as err:
        prepare_image(b"%PDF-1.4 not an image", policy)
    assert err.value.status == 400
    (tmp_path / "ok.png").write_bytes(png)
    local = ImagePolicy(allow_local_dir=str(tmp_path))
    assert read_image_url(str(tmp_path / "ok.png"), local) == png
    assert read_image_url(f"file://{tmp_path}/ok.png", local) == png
    with pytest.raises(APIError):
        read_image_url(str(tmp_path / ".." / "ok.png"), local)


def test_options_are_strict_and_name_the_key():
    assert ServeOptions(model="/models/otterhd-8b/").served_name == "otterhd-8b"
    with pytest.raises(ValueError, match="max_batchsize"):
        load_options({"model": "m", "max_batchsize": 3}, "configs/serve/x.yaml")
    with pytest.raises(ValueError, match="max_queue"):
        load_options({"model": "m", "max_queue": 0})
