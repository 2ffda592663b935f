"""Lookups and edits over one ONNX graph, shared by the CPU rewrites (export/cpu_*.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators


class GraphIndex:
    """Lookups over one graph: initializers, producers, consumers."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def made_by(self, name: str, op: str) -> onnx.NodeProto:
        node = self.producer.get(name)
        if node is None or node.op_type != op:
            raise LookupError(f"{name} is not made by {op}")
        return node

    def add_const(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def replace(self, old: list[onnx.NodeProto], new: list[onnx.NodeProto], first: bool = False) -> None:
        """Put `new` (in order) where the last of `old` was (their inputs exist by then) and drop `old`.

        `first`: where the first of `old` was, for `new` reading only graph inputs and constants while
        readers of its outputs may sit between the old nodes."""
        nodes = list(self.graph.node)
        places = [nodes.index(n) for n in old]
        at = min(places) if first else max(places)
        for node in reversed(new):
            self.graph.node.insert(at, node)
        for n in old:
            self.graph.node.remove(n)


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers no graph output depends on."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)
