"""The `sidetune` command line: run the stack (serve, api, inference, worker), talk to it (submit, jobs, models,
datasets, predict, report: worker/commands/), count parameters and plan jobs offline (params, plan), and the demo."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

from storage.settings import Settings


def _configure_logging(settings: Settings, level: str) -> logging.Logger:
    from storage.logs import configure_logging

    configure_logging(settings.log_format == "json", level=level.upper(), secrets=settings.all_keys)
    return logging.getLogger("sidetune.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the stack and supervise it until SIGINT (Ctrl-C), SIGTERM or SIGHUP. The handlers are installed
    explicitly: a `serve` started in the background by a script inherits SIGINT ignored, and Python's default
    SIGTERM would leave the children running."""
    from worker.launcher import Stack

    settings = Settings()
    _configure_logging(settings, "INFO")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    stack = Stack(settings)
    print(
        f"starting Redis ({settings.redis_url or 'embedded'}), extract and train workers, the inference service "
        f"and the API; logs in {stack.logs_where}",
        flush=True,
    )
    try:
        stack.start(stop=stop)
        if not stop.is_set():
            print(
                f"sidetune is ready at {stack.api_url} (docs: {stack.api_url}/docs); Ctrl-C stops everything",
                flush=True,
            )
        while not stop.wait(1.0):
            pass
    finally:
        print("stopping...", flush=True)
        stack.stop()
    return 0


def _uvicorn(app: str, host: str, port: int) -> int:
    import uvicorn

    settings = Settings()
    log = _configure_logging(settings, "INFO")
    if not settings.all_keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.error("refusing to listen on %s without API keys: set SIDETUNE_API_KEYS", host)
        return 2
    if not settings.all_keys:
        log.warning("no API keys configured: listening on loopback only, without authentication")
    # log_config=None keeps our handler: uvicorn's loggers (access lines included) propagate to it.
    uvicorn.run(app, host=host, port=port, log_level="info", log_config=None)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    settings = Settings()
    return _uvicorn("api.main:app", settings.api_host, settings.api_port)


def cmd_inference(args: argparse.Namespace) -> int:
    settings = Settings()
    return _uvicorn("api.inference:app", settings.inference_host, settings.inference_port)


def cmd_worker(args: argparse.Namespace) -> int:
    """One Celery worker, embedded through Celery's WorkController: our logging only (Celery's is never set up, so
    every line, its own included, leaves as our JSON or text), no banner, and our signal handlers. SIGTERM, SIGINT and
    SIGQUIT all stop it at once (Celery's cold shutdown): a step in progress is interrupted and its message returned
    to the queue, and the next worker resumes it from what was finished. The heartbeat and watchdog run as a bootstep
    of its consumer (worker/heartbeat.py)."""
    from celery.exceptions import WorkerTerminate

    from worker.celery_app import app
    from worker.heartbeat import Heartbeat

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    settings = Settings()
    log = _configure_logging(settings, args.loglevel)
    app.steps["consumer"].add(Heartbeat)
    name = f"{'+'.join(queues)}@{socket.gethostname()}-{os.getpid()}"
    # The solo pool keeps CUDA in this process (CUDA does not survive a fork) and runs one task at a time.
    worker = app.WorkController(
        hostname=name,
        queues=queues,
        pool_cls="solo",
        concurrency=1,
        loglevel=args.loglevel,
        without_gossip=True,
        without_mingle=True,
    )

    def _stop(signum: int, _frame: object) -> None:
        log.warning(
            "worker %s: %s, stopping (a step in progress returns to the queue)", name, signal.Signals(signum).name
        )
        raise WorkerTerminate(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, _stop)
    if "train" in queues:  # in the background: the worker takes messages meanwhile, and a job would wait on the import
        from services.training.runs import warm_up

        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    log.info("worker %s consuming %s", name, ", ".join(queues))
    worker.start()
    # Leaving: the interpreter's last collection would walk the whole heap (torch, and the compiler stack the warm-up
    # imported) for seconds, which a stack's stop (and a restart) waited on; frozen objects are not walked.
    gc.freeze()
    return worker.exitcode or 0


def _layers(spec: str) -> str | int | list[int]:
    """`all`, a count (`4`), or 0-based block indices (`0,5,11`; `5,` is the single index 5)."""
    spec = spec.strip()
    try:
        if spec == "all":
            return spec
        if "," in spec:
            return [int(i) for i in spec.split(",") if i.strip()]
        return int(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not `all`, a count, or a comma-separated index list") from None


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value  # a bare string, e.g. pool=mean


def cmd_params(args: argparse.Namespace) -> int:
    from services.modality import modality_for
    from services.params import count_parameters
    from services.video.spec import VideoSpec

    options = dict(args.option)
    for key in ("rank", "layers"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.frames is None and args.tubelet != 2:
        print("error: --tubelet needs --frames", file=sys.stderr)
        return 2
    try:
        video = None if args.frames is None else VideoSpec(num_frames=args.frames, tubelet=args.tubelet)
        n = count_parameters(
            args.backbone,
            args.method,
            options,
            image_size=args.image_size,
            tail_blocks=args.tail_blocks,
            num_classes=args.num_classes,
            video=video,
        )
    except ValueError as e:  # a ValidationError of the clips' spec too
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"backbone    {n.backbone}: {modality_for(video).backbone_words()}{n.num_layers} blocks, {n.tokens} tokens, "
        f"dim {n.dim}, {n.backbone_params:,} parameters"
    )
    print(f"method      {n.method} {json.dumps(n.config)}")
    print(
        f"trainable   {n.side:,} (classifier excluded), of which {n.scalars} single scalars (e.g. per-layer "
        f"scales): {n.side - n.scalars:,} without them"
    )
    print(f"classifier  {n.classifier:,} for {args.num_classes} classes (not counted); model total {n.total:,}")
    print(n.side)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The plan of a job spec, computed here (no server) under the settings of this environment."""
    from pydantic import ValidationError

    from services.jobs.plan_text import describe
    from services.jobs.planner import plan
    from services.modality import modality_for
    from services.spec import JobSpec

    try:
        spec = JobSpec.model_validate(json.loads(Path(args.spec).read_text()))
        job_plan = plan(spec, Settings())
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
        print(f"error: invalid job spec: {problems}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # DatasetError and JSONDecodeError are ValueErrors; a missing file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(job_plan.model_dump_json(indent=2) if args.json else describe(job_plan, modality_for(spec.backbone)))
    return 1 if job_plan.fits is False or job_plan.memory_fits is False else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(epochs=args.epochs, video=args.video, per_class=args.per_class)


EXAMPLES = """examples:
  sidetune serve                                     # the whole stack on this machine
  sidetune datasets upload flowers.zip               # -> ds_...
  sidetune submit spec.json --wait                   # -> job_... and, once it succeeds, model_...
  sidetune jobs events job_... --follow
  sidetune predict model_... cat.png
  sidetune models export model_... --format onnx -o model.onnx
  sidetune report model_...
  every command: sidetune COMMAND --help"""
EXIT_USAGE = 2  # bad arguments, or a spec file that cannot be read or is invalid
EXIT_UNREACHABLE = 3  # the API (or MLflow's server) could not be reached, or answered 5xx (a retry may succeed)
EXIT_REFUSED = 4  # the API refused the request (4xx: an invalid spec, an unknown id, a missing or wrong API key)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_CODES = """exit codes: 0 success; 1 the job failed (submit --wait) or the plan does not fit (plan); 2 bad arguments
or spec file; 3 the API is unreachable or answered 5xx; 4 the API refused the request (4xx, e.g. 401 without a valid
key); 130 interrupted. Errors are one line on stderr naming the cause and the URL."""


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "api": cmd_api,
    "inference": cmd_inference,
    "worker": cmd_worker,
    "params": cmd_params,
    "plan": cmd_plan,
    "demo": cmd_demo,
}  # the verbs run here; those that talk to the API carry their handler as `func` (worker/commands/)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = getattr(args, "func", None) or HANDLERS[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        code = _report(e)
        if code is None:
            raise
        return code


def _parser() -> argparse.ArgumentParser:
    from worker.commands import add_parsers
    from worker.commands.common import ENVIRONMENT

    parser = argparse.ArgumentParser(
        prog="sidetune",
        description=__doc__,
        epilog=f"{EXAMPLES}\n\n{ENVIRONMENT}\n\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(url=None, json=False)  # of the commands that talk to the API (worker/commands/)
    sub = parser.add_subparsers(dest="command", required=True)
    command = partial(_command, sub.add_parser)
    _add_stack_parsers(command)
    add_parsers(sub)  # the verbs that talk to the API
    _add_params_parser(command)
    _add_offline_parsers(command)
    return parser


Command = Callable[[str, str, str], argparse.ArgumentParser]  # (name, summary, example) -> the verb's parser


def _command(
    add_parser: Callable[..., argparse.ArgumentParser], name: str, summary: str, example: str
) -> argparse.ArgumentParser:
    return add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_stack_parsers(command: Command) -> None:
    """The verbs that run the stack or a part of it."""
    command(
        "serve",
        "run Redis (embedded unless SIDETUNE_REDIS_URL), both workers, the inference service and the API",
        "SIDETUNE_DATA_DIR=/data sidetune serve",
    )
    command("api", "run the API only (uvicorn)", "SIDETUNE_API_KEYS=secret SIDETUNE_API_HOST=0.0.0.0 sidetune api")
    command(
        "inference",
        "run the inference service only (uvicorn; predict v1 and v2, exports)",
        "SIDETUNE_DEVICE=cuda sidetune inference",
    )
    p = command("worker", "run one Celery worker", "sidetune worker --queues extract")
    p.add_argument("--queues", default="extract,train", help="comma-separated: extract, train")
    p.add_argument("--loglevel", default="INFO")


def _add_params_parser(command: Command) -> None:
    from services.methods import METHOD_NAMES

    p = command(
        "params",
        "count a method's trainable parameters on a backbone (meta device, no memory)",
        "sidetune params --backbone vit_base_patch16_224 --method losa --rank 16",
    )
    p.add_argument("--backbone", required=True, help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument("--method", required=True, choices=METHOD_NAMES)
    p.add_argument("--rank", type=int, help="the method's rank (methods that have one)")
    p.add_argument("--layers", type=_layers, metavar="SPEC", help="`all`, a count n, or block indices `0,5,11`")
    p.add_argument("--tail-blocks", type=int, help="adapt only the last k blocks (methods with a tail mode)")
    p.add_argument("--image-size", type=int, help="input resolution (default: the backbone's)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier size (excluded from the count)")
    p.add_argument("--frames", type=int, help="count on the ViViT of this many frames made of the backbone (video)")
    p.add_argument("--tubelet", type=int, default=2, help="frames per tubelet, with --frames (default 2)")
    p.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another config field, JSON value (repeatable)",
    )


def _add_offline_parsers(command: Command) -> None:
    """The verbs that need no server: plan and demo (which starts its own stack)."""
    p = command(
        "plan",
        "a job spec's cache size, quota and memory fit and extraction time, computed here (no "
        "server; `sidetune submit --dry-run` asks the server); exit code 1 when it cannot fit",
        "sidetune plan spec.json --json",
    )
    p.add_argument("spec", help="job spec (JSON file)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p = command(
        "demo", "embedded stack + digits: a linear probe and a LoSA job, end to end", "sidetune demo --epochs 5"
    )
    p.add_argument("--epochs", type=int, help="epochs of every job (default: each method's own; 15 with --video)")
    p.add_argument("--video", action="store_true", help="synthetic motion videos and a ViViT instead of digits")
    p.add_argument("--per-class", type=int, default=40, help="with --video: training videos per class")


def _report(e: Exception) -> int | None:
    """Print an error a user can act on as one line on stderr and return its exit code; None: a bug, raised on."""
    import httpx

    from worker.client import ApiError
    from worker.commands.common import CommandError

    if isinstance(e, httpx.TransportError):  # no answer: refused, timed out, reset
        where = e.request.url.copy_with(path="/", query=None) if _has_request(e) else "the API"
        print(
            f"error: cannot reach the sidetune API at {where} ({type(e).__name__}: {e or 'no answer'}); is "
            "`sidetune serve` running there? (--url or SIDETUNE_URL)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    if isinstance(e, ApiError):
        hint = " (give a key with SIDETUNE_API_KEY)" if e.status == 401 else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return EXIT_REFUSED if e.status < 500 else EXIT_UNREACHABLE
    if isinstance(e, CommandError):  # a UsageError too
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE if e.unreachable else EXIT_USAGE
    if isinstance(e, FileNotFoundError | json.JSONDecodeError):
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return None


def _has_request(e: Exception) -> bool:
    try:
        return e.request is not None  # type: ignore[attr-defined]
    except RuntimeError:  # httpx raises when the error has no request
        return False


if __name__ == "__main__":
    sys.exit(main())
