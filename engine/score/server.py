"""``rankpm serve``: a reward server over the one scorer, for RLHF loops and data filtering.

    rankpm serve runs/quickstart/model [--host 127.0.0.1] [--port 5000] [--token SECRET]
    rankpm serve runs/quickstart/model --replicas 2 [--address ray://HEAD:10001]   # Ray Serve

Routes (JSON in, JSON out; errors are {"error": message} with a 4xx status, never a 500):
  POST /get_reward  OpenRLHF's remote reward protocol (its client, remote_rm_fn in
                    openrlhf/utils/remote_rm_utils.py, main branch as of December 2026):
                    {"query": [...], "prompts": [...], "labels": [...]}
                    -> {"rewards": [...], "scores": [...], "extra_logs": {"rankpm_score": [...]}}.
                    A query is the prompt and the response as one text: it is split at its prompt when
                    the prompts are given, else after the last "\\n\\nAssistant:" of the dialogue.
  POST /score       {"context": str, "responses": [str, ...], "normalize": "none"|"center"|"standardize"}
                    -> {"scores": [...]}
  GET  /health      {"status": "ok"}: no token needed (load balancers)
  GET  /info        the model, its tokenizer, length policy, judge, score statistics and the limits

Concurrent requests are merged into one scoring pass (up to a token budget, or after a short
wait), run one pass at a time off the event loop. Safe by default: it binds 127.0.0.1; with a
token (``--token`` or RANKPM_SERVE_TOKEN) every route but /health wants
``Authorization: Bearer TOKEN`` (401 without, 403 wrong); the body size (413), texts per
request (413) and text length (422) are limited; a pass that outlasts the timeout answers
503. ``create_app`` builds the one app that uvicorn serves alone and Ray Serve replicates.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' annotations as types
import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import secrets
import signal
from pathlib import Path

from rankpm.engine.score.scorer import NORMALIZE, RewardScorer, check_inputs

log = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"
TOKEN_ENV = "RANKPM_SERVE_TOKEN"


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    device: str = "cpu"
    dtype: str = "fp32"
    token: str | None = None
    normalize: str = "none"  # what /get_reward returns as rewards (OpenRLHF's --normalize_reward)
    max_body_bytes: int = 8 << 20
    max_texts: int = 512  # responses (or queries) in one request
    max_text_chars: int = 100_000
    timeout_s: float = 60.0
    max_wait_ms: float = 5.0  # how long a pass waits for more requests to join it
    batch_chars: int = 200_000  # a pass takes requests until their texts reach this many characters
    strip_suffixes: tuple[str, ...] = ()  # e.g. a policy's end-of-sequence text at the end of OpenRLHF queries


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Batcher:
    """Merges concurrent requests into one scoring pass, one pass at a time."""

    def __init__(self, scorer: RewardScorer, options: ServerOptions):
        self.scorer, self.options = scorer, options
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankpm-score")
        self.task: asyncio.Task | None = None
        self.passes = self.requests = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def score(self, groups: list[tuple[str, list[str]]]) -> list[list[float]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((groups, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue.get()
            taken, chars = [item], _chars(item[0])
            deadline = loop.time() + self.options.max_wait_ms / 1000
            while chars < self.options.batch_chars and (left := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                taken.append(item)
                chars += _chars(item[0])
            await self._pass(loop, taken)

    async def _pass(self, loop, taken) -> None:
        taken = [(groups, future) for groups, future in taken if not future.cancelled()]  # timed out: dropped
        if not taken:
            return
        flat = [g for groups, _ in taken for g in groups]
        try:
            scores = await loop.run_in_executor(self.executor, self.scorer.score_groups, flat)
        except ValueError:  # one request's text the length policy refuses: score each alone to name it
            for groups, future in taken:
                try:
                    result = await loop.run_in_executor(self.executor, self.scorer.score_groups, groups)
                    _resolve(future, result)
                except ValueError as err:
                    _fail(future, RequestError(422, str(err)))
            return
        except Exception as err:  # noqa: BLE001 - handed to every waiting request, logged there
            for _, future in taken:
                _fail(future, err)
            return
        self.passes += 1
        self.requests += len(taken)
        start = 0
        for groups, future in taken:
            _resolve(future, scores[start:start + len(groups)])
            start += len(groups)


def _chars(groups) -> int:
    return sum(len(context) + sum(map(len, responses)) for context, responses in groups)


def _resolve(future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future, err) -> None:
    if not future.done():
        future.set_exception(err)


def split_query(query: str, prompt: str | None, index: int) -> tuple[str, str]:
    """(context, response) of an OpenRLHF query: after its prompt, or after the dialogue's last
    assistant turn."""
    if prompt is not None and query.startswith(prompt):
        return prompt, query[len(prompt):]
    cut = query.rfind(ASSISTANT)
    if cut < 0:
        why = "does not start with prompts[{0}] and has" if prompt is not None else "has"
        raise RequestError(422, f"query[{index}]: {why.format(index)} no '\\n\\nAssistant:' turn to split it into "
                                f"a context and a response; send prompts too")
    return query[:cut + len(ASSISTANT)], query[cut + len(ASSISTANT):]


def create_app(scorer: RewardScorer, options: ServerOptions, *, model_name: str = ""):
    """The FastAPI app: served alone by uvicorn, or as Ray Serve replicas (``ray_deployment``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    batcher = Batcher(scorer, options)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="rankpm reward server", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def request_error(_request, err: RequestError):
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(Exception)
    async def unexpected(_request, err: Exception):  # a message, never a bare 500 page
        log.exception("request failed")
        return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)

    def authorise(request: Request) -> None:
        if options.token is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise RequestError(401, "missing 'Authorization: Bearer <token>' header")
        if not secrets.compare_digest(header[7:].strip(), options.token):
            raise RequestError(403, "wrong token")

    async def body(request: Request) -> dict:
        authorise(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > options.max_body_bytes:
            raise RequestError(413, f"body of {declared} bytes exceeds the limit of {options.max_body_bytes}")
        raw = await request.body()
        if len(raw) > options.max_body_bytes:
            raise RequestError(413, f"body of {len(raw)} bytes exceeds the limit of {options.max_body_bytes}")
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the body is not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise RequestError(422, f"expected a JSON object, got {type(value).__name__}")
        return value

    def check_texts(texts: list[str], what: str) -> None:
        if len(texts) > options.max_texts:
            raise RequestError(413, f"{len(texts)} {what} exceed the limit of {options.max_texts} per request")
        check_lengths(texts, what)

    def check_lengths(texts: list[str], what: str) -> None:
        for i, text in enumerate(texts):
            if isinstance(text, str) and len(text) > options.max_text_chars:
                raise RequestError(422, f"{what}[{i}] has {len(text)} characters, over the limit of "
                                        f"{options.max_text_chars}")

    async def scored(groups: list[tuple[str, list[str]]]) -> list[list[float]]:
        try:
            return await asyncio.wait_for(batcher.score(groups), options.timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(503, f"scoring took longer than {options.timeout_s} s; retry later") from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info(request: Request):
        authorise(request)
        identity = scorer.tokenizer.identity()
        return {"model": model_name, "judge": scorer.judge, "max_length": scorer.max_length,
                "truncation": scorer.truncation, "layout": scorer.layout, "device": str(scorer.device),
                "dtype": scorer.dtype, "score_stats": scorer.score_stats, "normalize_rewards": options.normalize,
                "tokenizer": {k: identity.get(k) for k in ("kind", "vocab_size", "pad_id", "eoc_id", "fingerprint")},
                "limits": {"max_body_bytes": options.max_body_bytes, "max_texts": options.max_texts,
                           "max_text_chars": options.max_text_chars, "timeout_s": options.timeout_s},
                "passes": batcher.passes, "requests_scored": batcher.requests, "pid": os.getpid()}

    @app.post("/score")
    async def score(request: Request):
        data = await body(request)
        context, responses = data.get("context"), data.get("responses")
        normalize = data.get("normalize", "none")
        if normalize not in NORMALIZE:
            raise RequestError(422, f"normalize: got {normalize!r}, expected one of {list(NORMALIZE)}")
        try:
            check_inputs(context, responses)
        except (TypeError, ValueError) as err:
            raise RequestError(422, str(err)) from None
        check_texts(responses, "responses")
        check_lengths([context], "context")
        [raw] = await scored([(context, list(responses))])
        try:
            return {"scores": scorer.normalize_scores(raw, normalize)}
        except ValueError as err:
            raise RequestError(422, str(err)) from None

    @app.post("/get_reward")
    async def get_reward(request: Request):
        data = await body(request)
        queries, prompts = data.get("query"), data.get("prompts")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise RequestError(422, "query: expected a list of strings (prompt and response as one text each)")
        if prompts is not None and (not isinstance(prompts, list) or len(prompts) != len(queries)
                                    or not all(isinstance(p, str) for p in prompts)):
            raise RequestError(422, f"prompts: expected a list of {len(queries)} strings, one per query")
        check_texts(queries, "query")
        groups = []
        for i, query in enumerate(queries):
            for suffix in options.strip_suffixes:
                while suffix and query.endswith(suffix):
                    query = query[:-len(suffix)]
            context, response = split_query(query, prompts[i] if prompts is not None else None, i)
            groups.append((context, [response]))
        raw = [s[0] for s in await scored(groups)] if groups else []
        try:
            rewards = scorer.normalize_scores(raw, options.normalize)
        except ValueError as err:
            raise RequestError(422, str(err)) from None
        return {"rewards": rewards, "scores": rewards, "extra_logs": {"rankpm_score": raw}}

    return app


def app_from_folder(model_dir: str, options: ServerOptions):
    """Load the model and build the app (what each Ray Serve replica runs)."""
    scorer = RewardScorer.from_folder(model_dir, device=options.device, dtype=options.dtype)
    return create_app(scorer, options, model_name=str(model_dir))


def ray_deployment(model_dir: str, options: ServerOptions, *, replicas: int, gpus_per_replica: float):
    """The same app as a Ray Serve deployment of ``replicas`` replicas behind one endpoint."""
    from ray import serve

    def build():  # a builder function (not a partial): Ray Serve calls it on each replica
        return app_from_folder(model_dir, options)

    @serve.ingress(build)
    class RewardServer:
        """One replica: the app built on the replica, its own copy of the model."""

    return serve.deployment(RewardServer, name="rankpm-reward", num_replicas=replicas,
                            ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica})


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="a model folder (OUT_DIR/model), a checkpoint, a run folder, or a transformers "
                                      "reward model folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--token", default=None, help=f"bearer token every route but /health requires (or ${TOKEN_ENV})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--normalize", choices=NORMALIZE, default="none",
                        help="what /get_reward returns as rewards (the model's saved statistics)")
    parser.add_argument("--max-texts", type=int, default=512, help="texts in one request")
    parser.add_argument("--max-text-chars", type=int, default=100_000)
    parser.add_argument("--max-body-mb", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait for its scores")
    parser.add_argument("--strip-suffix", action="append", default=[],
                        help="text removed from the end of /get_reward queries (e.g. a policy's end-of-sequence "
                             "text); repeatable")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a scoring pass waits for concurrent requests to join it")
    parser.add_argument("--batch-chars", type=int, default=200_000,
                        help="a pass takes requests until their texts reach this many characters (0: one request "
                             "per pass, no merging)")
    parser.add_argument("--replicas", type=int, default=0, help="serve on Ray Serve with this many replicas")
    parser.add_argument("--address", default=None, help="Ray cluster for --replicas (default: a local one)")
    return parser


def run_serve(args: argparse.Namespace) -> int:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    options = ServerOptions(device=device, dtype=args.dtype, token=args.token or os.environ.get(TOKEN_ENV) or None,
                            normalize=args.normalize, max_body_bytes=int(args.max_body_mb * 2**20),
                            max_texts=args.max_texts, max_text_chars=args.max_text_chars, timeout_s=args.timeout,
                            max_wait_ms=args.max_wait_ms, batch_chars=args.batch_chars,
                            strip_suffixes=tuple(args.strip_suffix))
    model_dir = str(Path(args.model).resolve())
    if args.host not in ("127.0.0.1", "localhost", "::1") and options.token is None:
        log.warning("serving on %s without a token: anyone who reaches the port can use the model", args.host)
    if args.replicas:
        return _serve_on_ray(model_dir, options, args)
    import uvicorn

    app = app_from_folder(model_dir, options)
    log.info("rankpm reward server on http://%s:%d (POST /get_reward, POST /score, GET /health, GET /info)",
             args.host, args.port)
    # uvicorn drains the requests in flight on SIGTERM, then hands the signal back: end with status 0
    signal.signal(signal.SIGTERM, _stopped)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0


def _stopped(_signum, _frame):
    raise SystemExit(0)


def _serve_on_ray(model_dir: str, options: ServerOptions, args) -> int:
    import ray
    from ray import serve

    ray.init(address=args.address) if args.address else ray.init(include_dashboard=False)
    gpus = 1 if options.device == "cuda" else 0
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(ray_deployment(model_dir, options, replicas=args.replicas, gpus_per_replica=gpus).bind(),
              name="rankpm", route_prefix="/")
    log.info("rankpm reward server: %d Ray Serve replicas on http://%s:%d", args.replicas, args.host, args.port)
    try:
        while True:
            asyncio.run(asyncio.sleep(3600))
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
