"""Triton python model `tokenizer`: TYPE_STRING text [, text_pair] -> the backbone's int64 inputs."""

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
from serving.contract import TEXT, TEXT_PAIR  # noqa: E402
from serving.errors import InputError  # noqa: E402
from serving.tokenize import TextTokenizer, decode_texts  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = pm.parameters(config)
        self.name = config["name"]
        self.inputs = pm.tensor_specs(config, "input")
        self.pairs = any(t.name == TEXT_PAIR for t in self.inputs)
        output_names = tuple(t.name for t in pm.tensor_specs(config, "output"))
        self.tokenizer = TextTokenizer(
            pm.version_dir(args) / params["tokenizer_dir"], int(params["max_length"]), output_names
        )
        self.max_bytes = int(params["max_text_bytes"]) if "max_text_bytes" in params else None

    def _handle(self, inputs: dict) -> dict:
        if TEXT not in inputs:
            raise InputError(f"input {TEXT} is missing")
        texts = decode_texts(inputs[TEXT], TEXT, self.max_bytes)
        pairs = None
        if self.pairs:
            if TEXT_PAIR not in inputs:
                raise InputError(f"this task classifies text pairs: input {TEXT_PAIR} is missing")
            pairs = decode_texts(inputs[TEXT_PAIR], TEXT_PAIR, self.max_bytes)
        return self.tokenizer(texts, pairs)

    def execute(self, requests):
        return pm.respond_each(pb_utils, requests, self.inputs, self._handle, self.name)

    def finalize(self):
        self.tokenizer = None
