"""Triton python model running one ONNX Runtime session: the CPU target's backbone or adapter_<task>."""

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
from serving.onnx_runner import InputLimits, OnnxRunner  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = pm.parameters(config)
        self.name = config["name"]
        self.runner = OnnxRunner(
            pm.version_dir(args) / params["onnx_file"],
            pm.tensor_specs(config, "input"),
            pm.tensor_specs(config, "output"),
            threads=int(params["threads"]),
            accuracy_level=int(params["accuracy_level"]),
            runtime=params.get("runtime", "exact"),
            limits=InputLimits.from_parameters(params),
        )

    def execute(self, requests):
        return pm.respond_merged(pb_utils, requests, self.runner.inputs, self.runner.check, self.runner.run, self.name)

    def finalize(self):
        self.runner = None
