"""Serving throughput: the OpenAI-compatible Ray Serve app under 1 / 8 / 32 concurrent HTTP clients, against
transformers `generate` answering one request at a time (issue 14, item 7).

    source .devbundle/setup.sh && python benchmarks/serve_throughput.py --out $OUT          # H200: Fuyu-8B shape
    python benchmarks/serve_throughput.py --flavour debug --device cpu --clients 1,2 --out /tmp/sb   # CPU smoke

Workload: one request = one 1920x1080 JPEG (sent as a base64 data URI) + a short question, `resolution` 1440
(short side -> 1440, then Fuyu's 1080x1920 cap: 36x64 patches, ~2,400-token prompt), `max_tokens` 32, greedy,
streamed (SSE). `--images K` distinct images are cycled over the requests (default 32: at 32 clients no two
requests in flight share an image, so there is no shared prefill to help). Every client is closed-loop: it sends
its next request when the previous answer has ended, `--requests` requests per client, after one untimed warm-up
round at that concurrency. Weights are random (fuyu-8b shape, bf16 on GPU), saved once as an HF directory under
`--model-dir` (not under --out); the tokenizer is the tiny offline one (543 pieces in a 262,144-row vocabulary).

The random model is made to write text (benchmark only): its `lm_head` rows are zeroed for every id that is not a
plain text piece of the tokenizer (ids past the tokenizer, the 256 byte-fallback pieces `<0x..>`, special and
end tokens), so greedy decoding picks a text piece at every step (their random logits' max is > 0). Without
this, almost every token was an id the tokenizer decodes to "" (or a byte piece the stream decoder holds back
until its run ends), no content reached the client until the end, and "time to first token" equalled latency.
No end token can be chosen either, so every request generates exactly `--new-tokens` tokens, like the baseline.

Reported per concurrency: requests/s (completed / wall time from first send to last answer), latency p50/p95
(send -> last byte), client TTFT p50/p95 (send -> first non-empty content chunk), and from the server's
`GET /stats` (the replica's own clock, from the request's arrival at the handler): first token p50/p95 (the first
generated token reached the host: body read, JSON, image decode/resize/patchify, queueing and prefill included),
`prep` p50 (arrival -> queued: body, JSON, image, prompt), `start` p50 (arrival -> its batch started), and the mean
batch size. `--ab` (on by default) repeats the concurrent levels with `arrival_wait_s=0`, the batching before
this change (a ready batch started with whatever had been queued), in the same run.
Baseline, same run, before Serve starts (so it has the GPU alone): transformers `FuyuForCausalLM.generate` (sdpa,
batch 1, 32 new tokens forced) on the same prompts one after another, pre-processing included, as
benchmarks/eval_throughput.py (a) does. No HTTP on the baseline: it is the best case of one-at-a-time serving.
Issue 14 targets: >= 6 requests/s at 32 clients on one H200 (>= 7x the baseline), p50 TTFT <= 0.5 s at 1 client.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import gc
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_throughput import HFRunner, build_hf_model, make_image, sync  # noqa: E402

from otterhd_ray.data.processor import FuyuProcessor  # noqa: E402
from otterhd_ray.data.tokenizer import build_tiny_tokenizer, fuyu_tokens, load_tokenizer  # noqa: E402
from otterhd_ray.models.fuyu import config_for_tokenizer, flavour_config, new_model, save_hf  # noqa: E402

QUESTION = "What color is the small triangle in the image? Answer in a few words."
TEMPLATE = "User:{q} Assistant:"  # what the server's default prompt style sends to the model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavour", default="fuyu-8b", choices=("fuyu-8b", "debug"))
    p.add_argument("--layers", type=int, default=0, help="keep only this many layers (0: the flavour's)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--resolution", type=int, default=1440)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="timed requests per client at each level")
    p.add_argument("--images", type=int, default=32, help="distinct images cycled over the requests")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--arrival-wait-s", type=float, default=1.0)
    p.add_argument("--ab", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the levels above 1 client with arrival_wait_s=0 (the batching before)")
    p.add_argument("--baseline-requests", type=int, default=6, help="transformers generate requests (0: skip)")
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation of the baseline")
    p.add_argument("--model-dir", default=None, help="HF dir of the random model (default /tmp/...; reused)")
    p.add_argument("--port", type=int, default=0, help="Serve HTTP port (0: a free one)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="results directory (default $OUT)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ set-up
def prepare_model_dir(args: argparse.Namespace, device: str, dtype: torch.dtype) -> Path:
    """Random weights of the flavour's shape saved once as an HF dir with the tiny tokenizer (reused if there)."""
    out = Path(args.model_dir or f"/tmp/otterhd-serve-bench-{args.flavour}-{args.layers or 'all'}-text")
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out)
    cfg = config_for_tokenizer(flavour_config(args.flavour), tok)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = new_model(cfg, dtype=dtype, device=device)
    keep = text_piece_ids(tok)
    with torch.no_grad():  # the model writes text: module doc
        mask_V = torch.ones(cfg.vocab_size, dtype=torch.bool, device=model.lm_head.weight.device)
        mask_V[keep] = False
        model.lm_head.weight[mask_V] = 0
    print(f"lm_head: kept the rows of {len(keep)} text pieces, zeroed {int(mask_V.sum())}", flush=True)
    save_hf(model, out)
    del model
    gc.collect()
    print(f"saved random {args.flavour} ({cfg.num_layers} layers) to {out} in {time.perf_counter() - start:.0f} s",
          flush=True)
    return out


def text_piece_ids(tok: Any) -> list[int]:
    """Ids of the tokenizer's plain text pieces: no byte-fallback piece, no special, end, image or answer token."""
    import re

    tokens = fuyu_tokens(tok)
    special = set(tok.all_special_ids) | {tokens.image, tokens.newline, tokens.bos, tokens.end, tokens.boa}
    return sorted(i for piece, i in tok.get_vocab().items()
                  if i not in special and not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece))


def image_payloads(args: argparse.Namespace) -> list[str]:
    return ["data:image/jpeg;base64," + base64.b64encode(make_image(args.width, args.height, seed=i)).decode()
            for i in range(args.images)]


# ------------------------------------------------------------------------------------------------ baseline
def run_baseline(args: argparse.Namespace, model_dir: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """transformers generate, one request at a time, 32 new tokens forced, pre-processing timed."""
    from otterhd_ray.models.fuyu.hf import read_config

    tok = load_tokenizer(model_dir)
    hf_model = build_hf_model(read_config(model_dir), dtype, device, args.attn)
    runner = HFRunner(hf_model, FuyuProcessor(tok), args.resolution, args.new_tokens, device)
    images = [make_image(args.width, args.height, seed=i) for i in range(max(2, min(args.images, 4)))]
    text = TEMPLATE.format(q=QUESTION)
    runner.generate([runner.encode(images[0], text)])  # warm-up
    sync(device)
    latencies = []
    for i in range(args.baseline_requests):
        start = time.perf_counter()
        runner.generate([runner.encode(images[i % len(images)], text)])
        sync(device)
        latencies.append(time.perf_counter() - start)
    del runner, hf_model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"method": f"transformers generate, 1 at a time ({args.attn})", "clients": 1,
            "requests": len(latencies), "req_per_s": len(latencies) / sum(latencies),
            "lat_p50": statistics.median(latencies), "lat_p95": _pct(latencies, 95), "ttft_p50": None,
            "ttft_p95": None, "tokens_per_req": float(args.new_tokens),
            "tokens_per_s": args.new_tokens * len(latencies) / sum(latencies), "errors": 0}


# ------------------------------------------------------------------------------------------------ clients
def one_request(port: int, body: bytes) -> dict[str, Any]:
    """POST a streamed chat completion: time to the first SSE event (the role chunk), to the first content, to
    the end; completion tokens from usage."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        detail = resp.read()[:300]
        conn.close()
        return {"ok": False, "status": resp.status, "detail": detail.decode(errors="replace")}
    first_event = first = None
    tokens = 0
    for raw in resp:  # SSE lines
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        first_event = first_event if first_event is not None else time.perf_counter() - start
        chunk = json.loads(line[5:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
            first = time.perf_counter() - start
    conn.close()
    end = time.perf_counter() - start
    return {"ok": True, "latency": end, "first_event": first_event, "ttft": first, "tokens": tokens}


def server_stats(port: int, after: int = 0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats?after={after}", timeout=30) as r:
        return json.loads(r.read())


def request_body(image_url: str, new_tokens: int, model: str) -> bytes:
    return json.dumps({
        "model": model, "max_tokens": new_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                  {"type": "text", "text": QUESTION}]}],
    }).encode()


def load_level(port: int, bodies: list[bytes], clients: int, per_client: int) -> tuple[list[dict], float]:
    """`clients` closed-loop threads, `per_client` requests each; returns the results and the wall time."""
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(clients * per_client))

    def client() -> None:
        for _ in range(per_client):
            with lock:
                k = next(counter)
            result = one_request(port, bodies[k % len(bodies)])
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def _pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(results: list[dict], wall: float, clients: int, stats: dict[str, Any], label: str) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    server = stats["summary"]

    def p(key: str, q: str) -> float | None:  # the client columns' quantiles, on the server's records
        values = [rec[key] for rec in stats["requests"]]
        return None if not values else statistics.median(values) if q == "p50" else _pct(values, 95)

    return {"method": label, "clients": clients, "requests": len(ok),
            "req_per_s": len(ok) / wall, "lat_p50": statistics.median(lat), "lat_p95": _pct(lat, 95),
            "ttft_p50": statistics.median(ttft) if ttft else None, "ttft_p95": _pct(ttft, 95) if ttft else None,
            "no_content": len(ok) - len(ttft),
            "first_event_p50": statistics.median(r["first_event"] for r in ok),
            "server_first_token_p50": p("first_token_s", "p50"), "server_first_token_p95": p("first_token_s", "p95"),
            "server_prep_p50": p("prepared_s", "p50"), "server_start_p50": p("started_s", "p50"),
            "server_finished_p50": p("finished_s", "p50"), "mean_batch": server.get("mean_batch_size"),
            "batch_sizes": server.get("batch_sizes"),
            "tokens_per_req": tokens / max(1, len(ok)), "tokens_per_s": tokens / wall,
            "errors": len(results) - len(ok),
            "error_sample": next((r for r in results if not r["ok"]), None),
            "raw": {"client": results, "server": stats["requests"]}}  # JSON only


# ------------------------------------------------------------------------------------------------ serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: argparse.Namespace, model_dir: Path, device: str, port: int, arrival_wait_s: float) -> str:
    """(Re)deploy the app with `arrival_wait_s` and wait until it answers."""
    import ray
    from ray import serve

    from otterhd_ray.serve.deployment import make_app
    from otterhd_ray.serve.options import ServeOptions

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        serve.delete("otterhd")
    opts = ServeOptions(model=str(model_dir), name="bench", device=device, resolution=args.resolution,
                        max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_s,
                        arrival_wait_s=arrival_wait_s,
                        max_queue=max(128, 2 * max(int(c) for c in args.clients.split(","))))
    serve.run(make_app(opts, num_replicas=1, num_gpus=1 if device == "cuda" else 0), name="otterhd",
              route_prefix="/", blocking=False)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return opts.served_name
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("the Serve app did not become healthy within 15 minutes")


# ------------------------------------------------------------------------------------------------ report
def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], baseline: float | None) -> str:
    head = ("| method | clients | requests | req/s | vs baseline | latency p50 / p95 (s) | client TTFT p50 / p95 (s) "
            "| server first token p50 / p95 (s) | server prep / start p50 (s) | mean batch | tokens/req | errors |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        speedup = f"{r['req_per_s'] / baseline:.1f}x" if baseline else "-"
        lines.append(
            f"| {r['method']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {speedup} "
            f"| {_fmt(r['lat_p50'], '.3f')} / {_fmt(r['lat_p95'], '.3f')} "
            f"| {_fmt(r['ttft_p50'], '.3f')} / {_fmt(r['ttft_p95'], '.3f')} "
            f"| {_fmt(r.get('server_first_token_p50'), '.3f')} / {_fmt(r.get('server_first_token_p95'), '.3f')} "
            f"| {_fmt(r.get('server_prep_p50'), '.3f')} / {_fmt(r.get('server_start_p50'), '.3f')} "
            f"| {_fmt(r.get('mean_batch'), '.1f')} | {r['tokens_per_req']:.1f} | {r['errors']} |")
    return head + "\n".join(lines) + "\n"


def run_levels(port: int, bodies: list[bytes], levels: list[int], per_client: int, label: str) -> list[dict]:
    rows = []
    for clients in levels:
        load_level(port, bodies, clients, 1)  # warm-up round at this concurrency (batch shapes, allocator)
        mark = server_stats(port)["last"]
        results, wall = load_level(port, bodies, clients, per_client)
        rows.append(summarize(results, wall, clients, server_stats(port, mark), label))
        print({k: v for k, v in rows[-1].items() if k not in ("error_sample", "raw")}, flush=True)
        if rows[-1]["errors"]:
            print(f"  first error: {rows[-1]['error_sample']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    levels = [int(c) for c in args.clients.split(",") if c]
    model_dir = prepare_model_dir(args, device, dtype)
    rows: list[dict[str, Any]] = []
    if args.baseline_requests:
        rows.append(run_baseline(args, model_dir, device, dtype))
        print(rows[-1], flush=True)
    port = args.port or free_port()
    name = start_serve(args, model_dir, device, port, args.arrival_wait_s)
    bodies = [request_body(url, args.new_tokens, name) for url in image_payloads(args)]
    try:
        rows += run_levels(port, bodies, levels, args.requests,
                           f"ours: Serve over HTTP, stream (arrival wait {args.arrival_wait_s:g} s)")
        if args.ab and [c for c in levels if c > 1]:
            start_serve(args, model_dir, device, port, 0.0)
            rows += run_levels(port, bodies, [c for c in levels if c > 1], args.requests,
                               "ours, no arrival wait (batching before)")
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    baseline = rows[0]["req_per_s"] if args.baseline_requests else None
    text = table(rows, baseline)
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    import ray
    import transformers

    header = (f"# Serving throughput ({datetime.date.today()}, {card}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, ray {ray.__version__})\n\n{args.flavour} shape"
              f"{f' ({args.layers} layers)' if args.layers else ''}, random weights, {dtype}, "
              f"{args.width}x{args.height} image at resolution {args.resolution}, {args.new_tokens} new tokens, "
              f"{args.images} distinct images, {args.requests} timed requests per client, max batch "
              f"{args.max_batch_size}. lm_head rows of non-text ids zeroed (the model writes text; module doc). "
              "Server columns: the replica's clock from the request's arrival (GET /stats).\n\n")
    print("\n" + header + text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve_throughput.md").write_text(header + text)
        (out / "serve_throughput.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2,
                                                              default=str))
        print(f"wrote {out / 'serve_throughput.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
