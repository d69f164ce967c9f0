"""Edits and reads of an ONNX graph shared by the weight and activation rewrites.

The tracer leaves marker nodes (`bitplan::Weight`, `bitplan::Activation`) where the QDQ nodes
go; replacing them must keep the graph topologically sorted and its initializers named as the
model's state_dict, and the metadata must be readable without loading a model's weights.

Imports onnx only.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

MARKER_DOMAIN = "bitplan"


def marker_nodes(graph: onnx.GraphProto, op_type: str) -> list[onnx.NodeProto]:
    """The `bitplan::<op_type>` marker nodes the tracer emitted, in graph order."""
    return [n for n in graph.node if n.domain == MARKER_DOMAIN and n.op_type == op_type]


def swap(graph: onnx.GraphProto, node: onnx.NodeProto, replacement: list[onnx.NodeProto]) -> None:
    """Replace `node` by `replacement` at its place, so the graph stays topologically sorted."""
    index = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(replacement):
        graph.node.insert(index + offset, new)


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes reading each tensor, so a rewrite can look one node downstream."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
    """Initializers named as the model's state_dict (the tracer saw it under `module.`)."""
    renamed = {
        init.name: init.name.removeprefix(prefix)
        for init in proto.graph.initializer
        if init.name.startswith(prefix)
    }
    taken = {init.name for init in proto.graph.initializer} - set(renamed)
    renamed = {old: new for old, new in renamed.items() if new not in taken}
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def drop_unused_initializers(proto: onnx.ModelProto) -> None:
    """The float weights the markers replaced are no longer read."""
    used = {name for node in proto.graph.node for name in node.input}
    used |= {output.name for output in proto.graph.output}
    keep = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def attribute(node: onnx.NodeProto, name: str) -> str:
    """A string attribute of a marker node (the tracer stores them as bytes)."""
    value = helper.get_attribute_value(next(a for a in node.attribute if a.name == name))
    return value.decode() if isinstance(value, bytes) else str(value)


def ints(node: onnx.NodeProto, name: str) -> list[int]:
    """An integer-list attribute, empty when the node omits it (its default)."""
    found = [a for a in node.attribute if a.name == name]
    return list(helper.get_attribute_value(found[0])) if found else []


def model_props(proto: onnx.ModelProto) -> dict[str, str]:
    """The model's `metadata_props`, where the plan and the storage tables travel."""
    return {prop.key: prop.value for prop in proto.metadata_props}


def stamp(path: str | Path, job_id: str) -> None:
    """Name the job in an exported file's metadata (`bitplan.job_id`): a job's id exists only
    once it is recorded, after the pipeline that exported it has run."""
    proto = onnx.load(str(path))
    props = {**model_props(proto), "bitplan.job_id": job_id}
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file, without loading its weights."""
    return model_props(onnx.load(str(path), load_external_data=False))
