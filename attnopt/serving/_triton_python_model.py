"""Triton Python-backend model: runs ``model.onnx`` (beside this file) with onnxruntime.

Written by attnopt into ``<repo>/<name>/1/model.py`` for tritonservers without the onnxruntime
backend (the pip-installed one bundled with nvidia-pytriton). It runs inside Triton's Python
backend stub, not in attnopt's environment: it imports only numpy, onnxruntime and Triton's
``triton_python_backend_utils``.

With ``max_batch_size > 0`` Triton's dynamic batcher hands ``execute`` several requests at once;
requests whose non-batch shapes and dtypes agree are concatenated along the batch axis and run as
one onnxruntime call, and the outputs are split back per request. Requests of other shapes (e.g.
another sequence length) run as their own group.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One model instance: an onnxruntime session on the version directory's model.onnx."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"],
                            params.get("onnx_file", "model.onnx"))
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        so.inter_op_num_threads = int(params.get("inter_op_thread_count", "0"))
        if params.get("execution_mode", "0") == "1":
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        providers = ["CPUExecutionProvider"]
        if (args.get("model_instance_kind") == "GPU"
                and "CUDAExecutionProvider" in ort.get_available_providers()):
            device = args.get("model_instance_device_id", "0")
            providers = [("CUDAExecutionProvider", {"device_id": int(device)}),
                         "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, so, providers=providers)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.batching = config.get("max_batch_size", 0) > 0

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        arrays = []
        for i, request in enumerate(requests):
            feed = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    feed[name] = tensor.as_numpy()
            arrays.append(feed)
            missing = [n for n in self.inputs if n not in feed]
            if missing:
                responses[i] = _error(f"missing inputs {missing}")
                continue
            key = tuple((n, feed[n].shape[1:] if self.batching else feed[n].shape,
                         feed[n].dtype.str) for n in self.inputs)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            try:
                self._run(members, arrays, responses)
            except Exception as e:  # noqa: BLE001 - becomes the requests' error responses
                for i in members:
                    responses[i] = _error(f"onnxruntime failed: {e}")
        return responses

    def _run(self, members, arrays, responses):
        if self.batching and len(members) > 1:
            feed = {n: np.concatenate([arrays[i][n] for i in members]) for n in self.inputs}
        else:
            feed = arrays[members[0]]
            if len(members) > 1:  # no batch axis: each request runs alone
                for i in members:
                    self._run([i], arrays, responses)
                return
        outs = self.session.run(self.outputs, feed)
        start = 0
        for i in members:
            size = arrays[i][self.inputs[0]].shape[0] if self.batching else 0
            tensors = []
            for name, out in zip(self.outputs, outs):
                part = out[start:start + size] if self.batching else out
                tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(part)))
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += size

    def finalize(self):
        self.session = None


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
