"""Requests to a Triton server with ``tritonclient``; runs in the server's environment.

Run with ``.venv-serve/bin/python`` (tritonclient's HTTP/gRPC clients live there, not in
attnopt's environment); it imports nothing from attnopt. Used by the tests and
``benchmarks/bench_serve.py`` through :func:`attnopt.serving.client.run_client`.

    infer: send each request of an ``.npz`` (keys ``<i>/<input name>``), one at a time
           (``--concurrency 1``, ``client.infer``) or all in flight from one thread
           (``client.async_infer``: one HTTP client is not shared across threads); write the
           outputs (``<i>/<output name>``) to an ``.npz``.
    load:  closed-loop load: ``--requests`` copies of request 0 with ``--concurrency`` in flight
           (gRPC ``async_infer`` with completion callbacks); print latencies, throughput,
           errors and the server's request / execution counts (JSON).
"""

import argparse
import functools
import json
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import np_to_triton_dtype


def _requests(path):
    data = np.load(path)
    out = {}
    for key in data.files:
        i, name = key.split("/", 1)
        out.setdefault(int(i), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


def _inputs(module, feed):
    inputs = []
    for name, array in feed.items():
        t = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def _stats(url, model):
    client = httpclient.InferenceServerClient(url)
    s = client.get_inference_statistics(model)["model_stats"][0]
    client.close()
    return {"requests": int(s["inference_stats"]["success"]["count"]),
            "failed": int(s["inference_stats"]["fail"]["count"]),
            "inferences": int(s["inference_count"]), "executions": int(s["execution_count"])}


def infer(args):
    requests = _requests(args.inputs)
    client = httpclient.InferenceServerClient(args.url, concurrency=max(1, args.concurrency))
    outputs = [o["name"] for o in client.get_model_metadata(args.model)["outputs"]]
    before = _stats(args.url, args.model)
    t0 = time.perf_counter()
    if args.concurrency <= 1:
        results = [client.infer(args.model, _inputs(httpclient, r)) for r in requests]
    else:
        pending = [client.async_infer(args.model, _inputs(httpclient, r)) for r in requests]
        results = [p.get_result() for p in pending]
    elapsed = time.perf_counter() - t0
    client.close()
    arrays = {f"{i}/{name}": res.as_numpy(name)
              for i, res in enumerate(results) for name in outputs}
    np.savez(args.out, **arrays)
    after = _stats(args.url, args.model)
    print(json.dumps({"elapsed_s": elapsed, "before": before, "after": after}))


def load(args):
    feed = _requests(args.inputs)[0]
    client = grpcclient.InferenceServerClient(args.grpc_url)
    for _ in range(args.warmup):
        client.infer(args.model, _inputs(grpcclient, feed))
    before = _stats(args.url, args.model)
    slots = threading.Semaphore(args.concurrency)
    done = threading.Event()
    lock = threading.Lock()
    latencies, errors = [], []

    def callback(start, result, error):  # tritonclient passes result=, error= by keyword
        try:
            with lock:
                latencies.append(time.perf_counter() - start)
                if error is not None:
                    errors.append(str(error))
                if len(latencies) == args.requests:
                    done.set()
        finally:
            slots.release()

    inputs = _inputs(grpcclient, feed)
    t0 = time.perf_counter()
    for _ in range(args.requests):
        slots.acquire()
        start = time.perf_counter()
        client.async_infer(args.model, inputs, callback=functools.partial(callback, start))
    done.wait(args.timeout)
    elapsed = time.perf_counter() - t0
    client.close()
    after = _stats(args.url, args.model)
    deadline = time.monotonic() + 2.0  # the server counts a request just after answering it
    while after["requests"] - before["requests"] < len(latencies) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = _stats(args.url, args.model)
    lat = np.array(latencies) * 1e3
    print(json.dumps({
        "requests": args.requests, "completed": len(latencies), "concurrency": args.concurrency,
        "errors": len(errors) + args.requests - len(latencies), "first_error": errors[:1],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "throughput_rps": len(latencies) / elapsed, "elapsed_s": elapsed,
        "latencies_ms": [round(x, 4) for x in lat.tolist()],
        "server_requests": after["requests"] - before["requests"],
        "server_executions": after["executions"] - before["executions"],
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("infer", "load"):
        sp = sub.add_parser(mode)
        sp.add_argument("--url", required=True, help="HTTP host:port")
        sp.add_argument("--model", required=True)
        sp.add_argument("--inputs", required=True, help=".npz of requests")
        sp.add_argument("--concurrency", type=int, default=1)
    sub.choices["infer"].add_argument("--out", required=True)
    sp = sub.choices["load"]
    sp.add_argument("--grpc-url", required=True, help="gRPC host:port")
    sp.add_argument("--requests", type=int, default=2000)
    sp.add_argument("--warmup", type=int, default=20)
    sp.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    (infer if args.mode == "infer" else load)(args)


if __name__ == "__main__":
    main()
