"""Ray Serve wrapper: one replica = one model + one batching queue + the FastAPI app of `app.create_app`.

Serve is only the host here (STYLE.md 8): the replica's constructor builds a `ChatService` and
`__serve_build_asgi_app__` hands Serve the app built around it (Ray 2.60's late-bound `@serve.ingress()`), so the
routes are the same object the tests drive without Serve.

    serve run otterhd_ray.serve.deployment:build_app model=/path/to/hf_dir     # or a config: configs/serve/
    otterhd serve --model DIR [--adapter DIR] [--replicas N] [--gpus-per-replica G] [--port P]
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from otterhd_ray.serve.app import create_app
from otterhd_ray.serve.build import build_service
from otterhd_ray.serve.options import ServeOptions, load_options

logger = logging.getLogger("ray.serve")


@serve.deployment(name="OtterHD", max_ongoing_requests=256, health_check_period_s=10)
@serve.ingress()
class OtterHDDeployment:
    def __init__(self, options: dict[str, Any]) -> None:
        from otterhd_ray.serve.metrics import RayMetrics

        opts = load_options(options)
        self.service = build_service(opts, metrics=RayMetrics(opts.served_name))
        logger.info("otterhd replica ready: model %s, batch %d, queue %d, auth %s", opts.served_name,
                    opts.max_batch_size, opts.max_queue, "on" if opts.api_key_env else "off")

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.service)

    def check_health(self) -> None:
        if not self.service.batcher.healthy():
            raise RuntimeError("the batching worker has stopped")


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (`serve run otterhd_ray.serve.deployment:build_app`, `import_path` in a Serve
    config): `args` are `ServeOptions` keys, checked here before any replica starts. Replicas and GPUs come from
    the config's `deployments:` section."""
    return make_app(load_options(dict(args), "serve application args"))


def make_app(opts: ServeOptions, num_replicas: int | None = None, num_gpus: float | None = None) -> Any:
    """The bound application; `num_replicas` / `num_gpus` are the `otterhd serve` flags."""
    overrides: dict[str, Any] = {
        # Above what the batcher holds, so a full queue is answered by our 429, not by Serve's back-pressure.
        "max_ongoing_requests": opts.max_batch_size + opts.max_queue + 16,
    }
    if num_replicas is not None:
        overrides["num_replicas"] = num_replicas
    if num_gpus is not None:
        overrides["ray_actor_options"] = {"num_gpus": num_gpus}
    return OtterHDDeployment.options(**overrides).bind(opts.model_dump())
