"""Triton python model `postprocess_<task>`: logits -> label (TYPE_STRING) and probabilities, or the score."""

import json
import os
import sys

# The stub runs Python isolated (PYTHONPATH is ignored): put the server's PYTHONPATH on sys.path
# so that the project package imports without being pip-installed (serving/server.py sets it).
for _entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _entry and _entry not in sys.path:
        sys.path.insert(0, _entry)

import triton_python_backend_utils as pb_utils  # noqa: E402  (exists only inside the stub)

from serving import python_model as pm  # noqa: E402
from serving.onnx_runner import check_tensor  # noqa: E402
from serving.postprocess import decoder  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.inputs = pm.tensor_specs(config, "input")
        self.outputs = tuple(t.name for t in pm.tensor_specs(config, "output"))
        params = pm.parameters(config)
        self.decoder = decoder(json.loads(params["labels"]), params.get("task_type", "classification"))

    def _handle(self, inputs: dict) -> dict:
        (spec,) = self.inputs
        check_tensor(spec, inputs[spec.name])
        return dict(zip(self.outputs, self.decoder(inputs[spec.name])))

    def execute(self, requests):
        return pm.respond_each(pb_utils, requests, self.inputs, self._handle, self.name)

    def finalize(self):
        self.decoder = None
