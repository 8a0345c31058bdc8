"""The same server, with the model in Ray Serve replicas: `python ray_serve.py`.

This process is KServe's ModelServer with every route, the API key, CORS and gRPC exactly as in
model.py (server.create_server); its one model is a kserve.ray.RayModel whose calls go to the
replicas of EmbeddingDeployment. Each replica holds an EmbeddingModel (backend + dynamic batcher),
and Ray Serve autoscales them between RAY_MIN_REPLICAS and RAY_MAX_REPLICAS.

Ray: a local instance (RAY_NUM_CPUS cores) unless RAY_ADDRESS names a cluster. With --attach
(RAY_ATTACH=true) this process deploys nothing and fronts the application that a KubeRay
RayService deployed from k8s/rayservice.yaml (serveConfigV2 -> build_app).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # replicas get it through runtime_env below as well
if not os.environ.get("RAY_ADDRESS"):
    # A local instance binds its GCS, raylet and workers to 127.0.0.1 (read when ray is imported).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray starts workers at nice 15; here the replicas are the service, as model.py's process is.
    os.environ.setdefault("RAY_worker_niceness", "0")

import argparse
import asyncio
import copy
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import ray
from kserve.protocol.infer_type import InferRequest, to_http_parameters
from kserve.ray import RayModel
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from embedding_server.engine.cache import NAMESPACE_HEADER
from embedding_server.operations.errors import ReplicaUnavailable
from embedding_server.operations.settings import (
    DEFAULT_MAX_BATCH_TOKENS,
    TRUE_WORDS,
    Limits,
    Settings,
    read_number,
)
from model import EmbeddingModel, build_parser, cache_namespace, configuration_errors, exit_now, start_up

logger = logging.getLogger(__name__)

DEFAULT_APP_NAME = "embedding"
DEPLOYMENT_NAME = "EmbeddingDeployment"
REPLICA_HEADER = "x-replica"
# Headers the replicas never need: the key stays in the front process.
PRIVATE_HEADERS = frozenset({"x-api-key", "authorization", "cookie"})
# Failures of a replica rather than of the request: an idempotent embedding is sent again.
REPLICA_FAILURES = (ActorDiedError, ActorUnavailableError, ReplicaUnavailableError)


@dataclass(frozen=True)
class RaySettings:
    """The Ray-only settings, from RAY_* variables (each also a flag of `python ray_serve.py`)."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: int = 32
    replica_cpus: float = 1.0
    num_cpus: int | None = None  # a local instance only; None lets Ray count the cores
    app_name: str = DEFAULT_APP_NAME
    request_timeout: float = 60.0
    retries: int = 2
    attach: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RaySettings:
        env = os.environ if env is None else env
        min_replicas = read_number(env, "RAY_MIN_REPLICAS", cls.min_replicas, 0)
        num_cpus = read_number(env, "RAY_NUM_CPUS", 0, 0) or None
        return cls(
            min_replicas=min_replicas,
            max_replicas=read_number(env, "RAY_MAX_REPLICAS", max(cls.max_replicas, min_replicas), 1),
            target_ongoing_requests=read_number(env, "RAY_TARGET_ONGOING_REQUESTS", cls.target_ongoing_requests, 0.1,
                                                kind=float),
            max_ongoing_requests=read_number(env, "RAY_MAX_ONGOING_REQUESTS", cls.max_ongoing_requests, 1),
            replica_cpus=read_number(env, "RAY_REPLICA_CPUS", cls.replica_cpus, 0.01, kind=float),
            num_cpus=num_cpus,
            app_name=env.get("RAY_APP_NAME", "").strip() or DEFAULT_APP_NAME,
            request_timeout=read_number(env, "RAY_REQUEST_TIMEOUT", cls.request_timeout, 0.1, kind=float),
            retries=read_number(env, "RAY_RETRIES", cls.retries, 0),
            attach=env.get("RAY_ATTACH", "").strip().lower() in TRUE_WORDS,
        )


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica needs to build its model; plain values so that it travels in serveConfigV2 args."""

    model_name: str
    model_path: str
    backend: str = "auto"
    precision: str = "auto"
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    threads: int = 1
    limits: dict[str, int] = field(default_factory=dict)  # settings.Limits fields; the rest keep defaults
    cache_dir: str | None = None
    trust_remote_code: bool = False  # model_dir.check_model_dir allowed the model's own code
    embedding_cache_mb: int = 0  # each replica's own cache; replica_config sets EMBEDDING_CACHE_MB


def replica_threads(replica_cpus: float) -> int:
    """Intra-op threads for one replica: its CPU share, at least one."""
    return max(1, int(replica_cpus))


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=2, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=20)
class EmbeddingDeployment:
    """One replica: the project's EmbeddingModel (backend + Batcher), called with KServe's (body, headers)."""

    def __init__(self, config: dict[str, Any]):
        replica = ReplicaConfig(**config)
        self.model = EmbeddingModel(replica.model_name, replica.model_path, backend=replica.backend,
                                    precision=replica.precision, max_batch_tokens=replica.max_batch_tokens,
                                    limits=Limits(**replica.limits), threads=replica.threads,
                                    cache_dir=replica.cache_dir, trust_remote_code=replica.trust_remote_code,
                                    embedding_cache_mb=replica.embedding_cache_mb)
        self.model.load()
        context = serve.get_replica_context()
        self.replica = f"{context.replica_id.unique_id}/{os.getpid()}"
        logger.info("replica %s ready with backend %s, %d threads", self.replica, self.model.backend.name,
                    replica.threads)

    async def __call__(self, body: Any, headers: dict[str, str] | None = None) -> tuple[Any, dict[str, str]]:
        """preprocess -> predict -> postprocess, returning (response, response headers) as kserve.Model does."""
        response, response_headers = await self.model(body, headers=headers)
        response_headers = dict(response_headers or {})
        response_headers[REPLICA_HEADER] = self.replica
        return response, response_headers

    def load(self) -> bool:
        """kserve.ray.RayModel's contract; the model loaded in __init__."""
        return self.model.ready

    async def get_input_types(self) -> list[dict]:
        return await self.model.get_input_types()

    async def get_output_types(self) -> list[dict]:
        return await self.model.get_output_types()

    def dimension(self) -> int:
        return self.model.backend.dimension

    def check_health(self) -> None:
        if not self.model.ready:
            raise RuntimeError("the model is not loaded")


def deployment_options(ray_settings: RaySettings) -> dict[str, Any]:
    return {
        "autoscaling_config": {
            "min_replicas": ray_settings.min_replicas,
            "initial_replicas": max(ray_settings.min_replicas, 1),
            "max_replicas": ray_settings.max_replicas,
            "target_ongoing_requests": ray_settings.target_ongoing_requests,
        },
        # High enough that the batcher in each replica sees concurrent requests to batch.
        "max_ongoing_requests": ray_settings.max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": ray_settings.replica_cpus,
            "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        },
    }


def replica_config(settings: Settings, ray_settings: RaySettings, **overrides: Any) -> ReplicaConfig:
    """The replicas' model, from the same environment as model.py; `overrides` are flags or serveConfigV2 args."""
    config = ReplicaConfig(
        model_name=settings.model_name,
        model_path=settings.model_path,
        backend=settings.backend,
        precision=settings.precision,
        max_batch_tokens=settings.max_batch_tokens,
        threads=replica_threads(ray_settings.replica_cpus),
        # A replica's wait bound is the front end's: Ray's router spreads requests over replicas and retries a dead
        # one's, so a replica refuses (429) only work that could not be done before RAY_REQUEST_TIMEOUT (503).
        limits=asdict(replace(settings.limits, max_queue_seconds=ray_settings.request_timeout)),
        cache_dir=settings.cache_dir,
        embedding_cache_mb=settings.embedding_cache_mb,
    )
    return ReplicaConfig(**{**asdict(config), **overrides})


def application(config: ReplicaConfig, ray_settings: RaySettings) -> serve.Application:
    return EmbeddingDeployment.options(**deployment_options(ray_settings)).bind(asdict(config))


def build_app(args: dict[str, Any]) -> serve.Application:
    """The import path of serveConfigV2 (`ray_serve:build_app`); `args` may set any ReplicaConfig field.

    Deployment options in serveConfigV2 (autoscaling, resources) override the ones set here.
    """
    ray_settings = RaySettings.from_env()
    return application(replica_config(Settings.from_env(), ray_settings, **(args or {})), ray_settings)


def _consume_outcome(task: asyncio.Future) -> None:
    """The cancelled call's outcome, which no one awaits any more (else asyncio logs it as never retrieved)."""
    if not task.cancelled():
        task.exception()


def portable(body: Any) -> Any:
    """The request as Ray can pickle it: a gRPC InferRequest keeps its parameters as a protobuf map."""
    if isinstance(body, InferRequest) and body.parameters is not None and not isinstance(body.parameters, dict):
        body = copy.copy(body)
        body.parameters = to_http_parameters(body.parameters)
    return body


class RayEmbeddingModel(RayModel):
    """KServe's RayModel, with bounded waits, retries on a dead replica, and 503s instead of hangs."""

    def __init__(self, name: str, handle: DeploymentHandle, timeout: float, retries: int):
        super().__init__(name, handle)
        self.timeout = timeout
        self.retries = retries

    def load(self) -> bool:
        self.ready = True
        return self.ready

    async def __call__(self, body: Any, headers: dict[str, str] | None = None, verb: Any = None,
                       ) -> tuple[Any, dict[str, str]]:
        namespace = cache_namespace(headers)
        headers = {k: v for k, v in (headers or {}).items() if k.lower() not in PRIVATE_HEADERS | {NAMESPACE_HEADER}}
        headers[NAMESPACE_HEADER] = namespace  # the replica's cache keeps keys apart without seeing them
        body = portable(body)
        deadline = time.monotonic() + self.timeout
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            response = self._handle.remote(body, headers=headers)
            waiter = asyncio.ensure_future(response)
            try:
                done, _ = await asyncio.wait({waiter}, timeout=remaining)
            except asyncio.CancelledError:  # the client went away: so does the replica's work
                response.cancel()
                raise
            if not done:
                response.cancel()
                waiter.add_done_callback(_consume_outcome)
                raise ReplicaUnavailable(f"no replica answered within {self.timeout:g}s")
            try:
                return waiter.result()
            except RayTaskError as exc:  # the replica raised: the request's own error (400, 413, 422, 429)
                if not isinstance(exc.cause, REPLICA_FAILURES):
                    raise exc.cause from None
                failure = exc.cause
            except REPLICA_FAILURES as exc:
                failure = exc
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise ReplicaUnavailable(str(exc)) from None
            # The router has dropped the dead replica by now; the next attempt goes to another one.
            logger.warning("replica failed (attempt %d of %d): %s", attempt + 1, self.retries + 1,
                           type(failure).__name__)
            await asyncio.sleep(min(0.2 * (attempt + 1), max(0.0, deadline - time.monotonic())))
        raise ReplicaUnavailable("the replica serving this request failed; retry shortly")


def build_ray_parser(settings: Settings, ray_settings: RaySettings) -> argparse.ArgumentParser:
    parser = build_parser(settings)
    group = parser.add_argument_group("Ray Serve")
    group.add_argument("--min_replicas", type=int, default=ray_settings.min_replicas, help="env RAY_MIN_REPLICAS")
    group.add_argument("--max_replicas", type=int, default=ray_settings.max_replicas, help="env RAY_MAX_REPLICAS")
    group.add_argument("--target_ongoing_requests", type=float, default=ray_settings.target_ongoing_requests,
                       help="requests per replica that autoscaling aims at (env RAY_TARGET_ONGOING_REQUESTS)")
    group.add_argument("--replica_cpus", type=float, default=ray_settings.replica_cpus,
                       help="CPUs reserved per replica (env RAY_REPLICA_CPUS)")
    group.add_argument("--ray_num_cpus", type=int, default=ray_settings.num_cpus,
                       help="CPUs of a local Ray instance (env RAY_NUM_CPUS); ignored with RAY_ADDRESS")
    group.add_argument("--attach", action="store_true", default=ray_settings.attach,
                       help="front an application deployed already (KubeRay RayService) (env RAY_ATTACH)")
    return parser


def wait_for_app(app_name: str, timeout: float) -> DeploymentHandle:
    """The handle of an application that another party (KubeRay) deploys, once it is running."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = serve.status().applications.get(app_name)
            if status is not None and status.status == "RUNNING":
                return serve.get_app_handle(app_name)
        except (RayServeException, ray.exceptions.RaySystemError) as exc:
            logger.info("Serve is not up yet: %s", exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Serve application {app_name!r} was not running after {timeout:g}s")
        time.sleep(2)


def main(argv: list[str] | None = None) -> None:
    with configuration_errors():
        ray_settings = RaySettings.from_env()
    started = start_up(argv, lambda settings: build_ray_parser(settings, ray_settings),
                       "scale with Ray replicas (RAY_MIN_REPLICAS / RAY_MAX_REPLICAS)",
                       needs_model_dir=lambda args: not args.attach)
    settings, args, model_dir = started.settings, started.args, started.model_dir
    if not 0 <= args.min_replicas <= args.max_replicas or args.max_replicas < 1:
        sys.exit("Configuration error: need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
    ray_settings = RaySettings(**{
        **asdict(ray_settings), "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests, "replica_cpus": args.replica_cpus,
        "num_cpus": args.ray_num_cpus, "attach": args.attach,
    })

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    elif ray_settings.attach:
        sys.exit("Configuration error: --attach needs RAY_ADDRESS (e.g. auto on a Ray node)")
    else:
        # "local": a new instance even when another one on this machine left its address in /tmp/ray.
        context = ray.init(address="local", num_cpus=ray_settings.num_cpus, include_dashboard=False,
                           log_to_driver=False)
        # Where another front end can attach (RAY_ADDRESS=... python ray_serve.py --attach) and `ray status` looks.
        print(f"Ray instance: {context.address_info['gcs_address']}", flush=True)
    try:
        if ray_settings.attach:
            handle = wait_for_app(ray_settings.app_name, timeout=max(600.0, ray_settings.request_timeout))
        else:
            config = replica_config(settings, ray_settings, model_name=args.model_name, model_path=model_dir.path,
                                    backend=args.backend, precision=args.precision,
                                    trust_remote_code=model_dir.has_code)
            app = application(config, ray_settings)
            # No Serve HTTP proxy: every request comes in through this process's KServe server.
            serve.start(proxy_location="Disabled")
            logger.info("Deploying %d..%d replicas of %s", ray_settings.min_replicas, ray_settings.max_replicas,
                        DEPLOYMENT_NAME)
            handle = serve.run(app, name=ray_settings.app_name, route_prefix=None)

        from embedding_server.server import create_server

        model = RayEmbeddingModel(args.model_name, handle, timeout=ray_settings.request_timeout,
                                  retries=ray_settings.retries)
        model.load()
        dimension = handle.dimension.remote().result(timeout_s=ray_settings.request_timeout)
        server = create_server(model, settings, args, dimension=dimension)
        server.start([model])
    finally:
        if not ray_settings.attach:
            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    # Through the module, so that Ray pickles EmbeddingDeployment by reference to ray_serve, not by value.
    import ray_serve

    ray_serve.main()
    exit_now()  # Serve and Ray have shut down in main()
