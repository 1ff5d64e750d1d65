"""Send real test images to a running gateway over HTTP, gRPC and /v1/classify.

    make serve                                  # in one shell
    .venv/bin/python examples/query_gateway.py  # in another

Prints, per protocol, the exit depth each image left at, its confidence and the
accuracy on the images sent.
"""

import argparse
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository root: run as a plain script
from common.paths import DEFAULT_DATA  # noqa: E402
from training.datasets import load_split_for_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", default="127.0.0.1:8080")
    parser.add_argument("--grpc", default="127.0.0.1:8081")
    parser.add_argument("--model", default=None,
                        help="model name (default: the first ready model in the gateway's repository index)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset with a test split")
    parser.add_argument("--count", type=int, default=16, help="images to send")
    args = parser.parse_args()

    http = httpclient.InferenceServerClient(args.http)
    if args.model is None:
        ready = [m["name"] for m in http.get_model_repository_index() if m.get("state") == "READY"]
        if not ready:
            parser.error(f"the gateway at {args.http} has no ready model")
        args.model = ready[0]
    print(f"model {args.model}")
    # The model's own input (C, H, W), from the gateway's KServe v2 metadata: uploads of other data
    # are converted to it here, as the gateway would for /v1/classify.
    metadata = http.get_model_metadata(args.model)
    test = load_split_for_model(args.data, "test", metadata["inputs"][0]["shape"][1:])
    chosen = np.random.default_rng(0).permutation(len(test))[: args.count]
    images, labels = test.images[chosen], test.labels[chosen]  # uint8 NHWC, normalised by the gateway

    for name, module, url in (("HTTP", httpclient, args.http), ("gRPC", grpcclient, args.grpc)):
        client = module.InferenceServerClient(url)
        tensor = module.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(args.model, [tensor])
        predicted = result.as_numpy("logits").argmax(axis=1)
        print(f"{name}: exit depths {result.as_numpy('exit_depth').tolist()}")
        print(f"{name}: confidence {[round(float(c), 2) for c in result.as_numpy('confidence')]}")
        print(f"{name}: accuracy {(predicted == labels).mean() * 100:.1f}% on {len(labels)} images")

    files = []
    for i, image in enumerate(images[:4]):
        buffer = io.BytesIO()
        Image.fromarray(image).resize((128, 128)).save(buffer, format="PNG")  # any size is fine
        files.append(("files", (f"image{i}.png", buffer.getvalue(), "image/png")))
    reply = httpx.post(f"http://{args.http}/v1/classify", files=files, params={"top_k": 2}, timeout=30)
    reply.raise_for_status()
    for result, label in zip(reply.json()["results"], labels):
        print(f"classify: {result['filename']}: {result['label']} (true {test.classes[label]}), "
              f"exit {result['exit_depth']}, top-2 {[t['label'] for t in result['top_k']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
