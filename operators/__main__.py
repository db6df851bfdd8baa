"""``python -m kubeml.operators``: run the Tenant operator (the container's entry point).

Serves kopf's liveness endpoint on ``--health-port`` (``/healthz``) and Prometheus metrics on
``--metrics-port`` (``/metrics``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from kubeml.errors import KubemlError
from kubeml.operators._desired import OperatorConfig, Peer
from kubeml.operators._metrics import Metrics
from kubeml.operators.tenant import TenantOperator, load_api_client


def _ports(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated port numbers, e.g. 8080,8081") from None


def _peer(text: str) -> Peer:
    try:
        return Peer.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    defaults = OperatorConfig()
    p = argparse.ArgumentParser(prog="python -m kubeml.operators", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", help="kubeconfig to use (default: in-cluster, then $KUBECONFIG)")
    p.add_argument("--resync-seconds", type=float, default=defaults.resync_s,
                   help="seconds between level-triggered resyncs of each Tenant")
    p.add_argument("--pod-security-version", default=defaults.pod_security_version)
    p.add_argument("--ingress-gateway-namespace", default=defaults.ingress_gateway_namespace)
    p.add_argument("--monitoring-namespace", default=defaults.monitoring_namespace)
    p.add_argument("--dns-namespace", default=defaults.dns_namespace)
    p.add_argument("--serving-ports", type=_ports, default=defaults.serving_ports,
                   help="tenant ports the ingress gateway may reach, e.g. 8080,8081")
    p.add_argument("--metrics-ports", type=_ports, default=defaults.metrics_ports,
                   help="tenant ports the monitoring namespace may scrape, e.g. 8080")
    for flow, what in (("kuberay", "KubeRay operator to Ray heads"), ("mlflow", "egress to MLflow"),
                       ("kafka", "egress to Kafka"), ("pipelines", "egress to Kubeflow Pipelines")):
        p.add_argument(f"--{flow}-peer", type=_peer, default=getattr(defaults, flow),
                       help=f"NAMESPACE:PORT[,PORT] of the {what} flow, or 'none' (default {getattr(defaults, flow)})")
    p.add_argument("--role-prefix", default=defaults.role_prefix)
    p.add_argument("--no-kubeflow-profiles", action="store_true", help="do not create Kubeflow Profiles")
    p.add_argument("--health-port", type=int, default=8080)
    p.add_argument("--metrics-port", type=int, default=9090, help="0 disables the metrics endpoint")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = OperatorConfig(
            pod_security_version=args.pod_security_version,
            ingress_gateway_namespace=args.ingress_gateway_namespace,
            monitoring_namespace=args.monitoring_namespace,
            dns_namespace=args.dns_namespace,
            serving_ports=args.serving_ports,
            metrics_ports=args.metrics_ports,
            kuberay=args.kuberay_peer,
            mlflow=args.mlflow_peer,
            kafka=args.kafka_peer,
            pipelines=args.pipelines_peer,
            kubeflow_profiles=not args.no_kubeflow_profiles,
            role_prefix=args.role_prefix,
            resync_s=args.resync_seconds,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = Metrics()
    try:
        api = load_api_client(args.kubeconfig)
    except KubemlError as exc:  # no kubeconfig, no in-cluster credentials: say so, exit
        print(f"error: {exc}", file=sys.stderr)
        return 2
    operator = TenantOperator(config, api, on_outcome=metrics.observe)
    if args.metrics_port:
        metrics.serve(args.metrics_port, operator.api)
    operator.run_forever(liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
