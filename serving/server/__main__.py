"""Command line of the model server: ``python -m kubeml.serving.server``.

Where it sits: the entry point of a model server process. ``kubeml.serving.manager``
starts servers as ``python -m kubeml.serving.server ...`` (and recognises them by that
module name in their command line); the KServe InferenceService runs the same command in
its predictor container. Flags are parsed and checked here before kserve or torch is
imported, then :func:`~kubeml.serving.server._run.serve` (``--model-dir``) or
:func:`~kubeml.serving.server._run.serve_repository` (``--models-dir``) runs the server.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from kubeml.errors import BundleError, ConfigError
from kubeml.serving.server._limits import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_REQUEST_TIMEOUT_S,
    EXIT_LOAD_FAILED,
    RUNTIMES,
    _check_timeouts,
)
from kubeml.serving.server._http import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S
from kubeml.serving.server._run import serve, serve_repository

__all__ = ["main"]

log = logging.getLogger("kubeml.serving.server")


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kubeml.serving.server",
        description="Serve a kubeml model bundle over KServe V1 and Open Inference Protocol V2.",
    )
    p.add_argument("--model-dir", type=Path, help="bundle directory (one model)")
    p.add_argument("--model-name", help="name in /v1/models/NAME and /v2/models/NAME")
    multi = p.add_argument_group(
        "multi-model", "serve every bundle under a directory, loaded through /v2/repository"
    )
    multi.add_argument("--models-dir", type=Path, help="directory of bundles, one per NAME/")
    multi.add_argument(
        "--max-memory-mb", type=float, default=1024.0, help="cap on loaded weights; LRU eviction"
    )
    multi.add_argument("--preload", default="", help="comma-separated models to load at start")
    p.add_argument("--model-version", default="", help="version reported in V2 metadata/responses")
    p.add_argument("--host", default="127.0.0.1",
                   help="address REST and gRPC listen on (default: loopback only; 0.0.0.0 in a pod)")
    p.add_argument("--http-port", required=True, type=_port)
    p.add_argument("--grpc-port", type=_port, default=None, help="enable gRPC V2 on this port")
    p.add_argument("--max-batch-size", type=int, default=None, help="most instances per request")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="answer 504 when one inference takes longer (0: no limit)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=DEFAULT_MAX_CONCURRENCY,
        help="inference requests in flight at once; more are answered 503 with Retry-After (0: no limit)",
    )
    access = p.add_argument_group(
        "access", "who may call the server, and how long a client may hold a connection"
    )
    access.add_argument("--auth-token-file", type=Path, default=None,
                        help="inference needs 'Authorization: Bearer T' with a token of this file "
                        "(one per line, re-read on change; a mounted Secret); default: open")
    access.add_argument("--admin-token-file", type=Path, default=None,
                        help="token of the model repository API (load/unload/index); required with --models-dir")
    access.add_argument("--tls-cert-file", type=Path, default=None, help="server certificate (PEM): turns on mTLS")
    access.add_argument("--tls-key-file", type=Path, default=None, help="server private key (PEM)")
    access.add_argument("--tls-client-ca-file", type=Path, default=None,
                        help="CA (PEM) that signs client certificates; clients without one are refused")
    access.add_argument("--header-timeout-s", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="close a connection whose request headers take longer")
    access.add_argument("--idle-timeout-s", type=int, default=DEFAULT_IDLE_TIMEOUT_S,
                        help="close a kept-alive connection idle for longer")
    batching = p.add_argument_group(
        "adaptive batching",
        "coalesce concurrent requests into one forward pass (single-model mode; off by default)",
    )
    batching.add_argument(
        "--batch-max-size",
        type=int,
        default=None,
        help="most instances per forward pass, summed over requests; turns batching on",
    )
    batching.add_argument(
        "--batch-max-latency-ms",
        type=float,
        default=None,
        help="longest wait of the oldest queued request before its batch runs (default 5)",
    )
    p.add_argument("--runtime", choices=RUNTIMES, default="pytorch", help="model runtime")
    p.add_argument(
        "--payload-log",
        default=None,
        help="sink for sampled payloads: a JSONL file, an http(s) URL, "
        "or kafka://HOST:PORT[,HOST:PORT]/TOPIC",
    )
    p.add_argument(
        "--payload-sample-rate", type=float, default=1.0, help="share of requests logged (0, 1]"
    )
    p.add_argument(
        "--payload-spool",
        default=None,
        metavar="DIR",
        help="Kafka sinks: keep records the broker cannot take yet in DIR, and send them "
        "once it answers (also after a restart)",
    )
    p.add_argument(
        "--payload-spool-max-mb",
        type=float,
        default=64.0,
        help="bound of the payload spool; records beyond it are dropped and counted (default 64)",
    )
    faults = p.add_argument_group(
        "fault injection", "test hook: make this server behave like a bad model version"
    )
    faults.add_argument(
        "--fault-error-rate",
        type=float,
        default=0.0,
        help="share of infer requests answered 503 (gRPC: UNAVAILABLE) at once",
    )
    faults.add_argument(
        "--fault-latency-ms",
        type=float,
        default=0.0,
        help="delay added to each infer request that reaches the model (inside its deadline)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from kubeml.serving.batching import BatchingConfig
    from kubeml.serving.telemetry import FaultInjection

    batching = None
    if args.batch_max_size is not None:
        if args.models_dir is not None:
            parser.error("--batch-max-size is for one model (--model-dir), not --models-dir")
        try:
            batching = BatchingConfig(
                args.batch_max_size,
                *(() if args.batch_max_latency_ms is None else (args.batch_max_latency_ms,)),
            )
        except ValueError as exc:
            parser.error(str(exc))
    elif args.batch_max_latency_ms is not None:
        parser.error("--batch-max-latency-ms needs --batch-max-size (which turns batching on)")
    try:
        _check_timeouts(args.request_timeout_s, batching)
    except ValueError as exc:
        parser.error(str(exc))

    if args.payload_spool and not (args.payload_log or "").startswith("kafka://"):
        parser.error("--payload-spool keeps records for a Kafka sink; it needs "
                     "--payload-log kafka://HOST:PORT/TOPIC")  # fmt: skip
    if not args.payload_spool_max_mb > 0:
        parser.error(f"--payload-spool-max-mb must be positive, got {args.payload_spool_max_mb}")
    tls_files = (args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file)
    if any(f is not None for f in tls_files) and not all(f is not None for f in tls_files):
        parser.error("mTLS needs all of --tls-cert-file, --tls-key-file and --tls-client-ca-file")
    access = {
        "auth_token_file": args.auth_token_file,
        "admin_token_file": args.admin_token_file,
        "tls": tuple(str(f) for f in tls_files) if tls_files[0] is not None else None,
        "header_timeout_s": args.header_timeout_s,
        "idle_timeout_s": args.idle_timeout_s,
    }

    if args.models_dir is not None:
        if args.model_dir is not None:
            parser.error("use either --model-dir (one model) or --models-dir (many), not both")
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        try:
            return serve_repository(
                args.models_dir,
                host=args.host,
                http_port=args.http_port,
                grpc_port=args.grpc_port,
                max_memory_bytes=int(args.max_memory_mb * 1024 * 1024),
                runtime=args.runtime,
                preload=tuple(n for n in args.preload.split(",") if n),
                max_body_bytes=args.max_body_bytes,
                request_timeout_s=args.request_timeout_s,
                max_concurrency=args.max_concurrency,
                **access,
            )
        except ConfigError as exc:
            log.error("%s", exc)
            return 2
        except BundleError as exc:
            log.error("%s", exc)
            return EXIT_LOAD_FAILED
    if args.model_dir is None or not args.model_name:
        parser.error("--model-dir and --model-name are required (or --models-dir)")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.model_name):
        log.error(
            "model name %r is not URL-safe; use letters, digits, '.', '_', '-'", args.model_name
        )
        return 2
    try:
        return serve(
            args.model_dir,
            model_name=args.model_name,
            model_version=args.model_version,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            max_batch_size=args.max_batch_size,
            max_body_bytes=args.max_body_bytes,
            payload_log=args.payload_log,
            payload_sample_rate=args.payload_sample_rate,
            payload_spool=args.payload_spool,
            payload_spool_max_bytes=int(args.payload_spool_max_mb * 1024 * 1024),
            fault=FaultInjection(args.fault_error_rate, args.fault_latency_ms),
            runtime=args.runtime,
            batching=batching,
            request_timeout_s=args.request_timeout_s,
            max_concurrency=args.max_concurrency,
            **access,
        )
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except BundleError as exc:
        log.error("%s", exc)
        return EXIT_LOAD_FAILED


if __name__ == "__main__":
    sys.exit(main())
