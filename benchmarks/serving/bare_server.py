"""The peer of the serving benchmark: a bare KServe ``ModelServer`` serving the same bundle.

A minimal ``kserve.Model`` (no kubeml validation, telemetry or router), so the benchmark
shows what kubeml's additions cost. Run as::

    python benchmarks/serving/bare_server.py BUNDLE_DIR HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import sys


def main() -> None:
    bundle, http_port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.argv = sys.argv[:1]  # kserve parses sys.argv at import
    import numpy as np
    import torch
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

    from kubeml.bundle import load_bundle

    class Bare(Model):
        def load(self) -> bool:
            self.module, _ = load_bundle(bundle)
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers=None) -> InferResponse:
            x = payload.inputs[0].as_numpy().astype(np.float32)
            with torch.inference_mode():
                probs = torch.softmax(self.module(torch.from_numpy(x)), dim=1).numpy()
            preds = probs.argmax(axis=1).astype(np.int64)
            n = len(preds)
            data_p = preds.tolist() if payload.from_grpc else preds
            data_q = probs.ravel().tolist() if payload.from_grpc else probs
            return InferResponse(
                response_id=payload.id or "",
                model_name=self.name,
                infer_outputs=[
                    InferOutput("predictions", [n], "INT64", data=data_p),
                    InferOutput("probabilities", [n, probs.shape[1]], "FP32", data=data_q),
                ],
                from_grpc=payload.from_grpc,
            )

    model = Bare("digits")
    model.load()
    ModelServer(
        http_port=http_port, grpc_port=grpc_port, enable_grpc=True, workers=1,
        enable_docs_url=False, enable_latency_logging=False, access_log_format=None,
    ).start([model])


if __name__ == "__main__":
    main()
