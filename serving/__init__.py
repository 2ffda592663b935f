"""Serving stage: exported runs -> a Triton model repository -> a running tritonserver -> clients.

    from serving.repository import generate_repository      # runs -> model_repository/ (validated)
    from serving.server import ServerOptions, TritonServer  # the embedded tritonserver, a context manager
    from serving.client import Client                       # Client(url, "http"|"grpc").classify(task, texts)

See serving/README.md for the layout, the decisions taken and what was verified here.
"""
