"""A rewrite of the exported graph for ONNX Runtime: each layer's self-attention, which the exporter
writes out op by op, becomes one `com.microsoft.Attention` node.

The exporter gives, per layer, three projections (MatMul, Add, Reshape, Transpose), the scores
(MatMul, Mul by 1/sqrt(head size), Add the mask's -10000), Softmax, the weighted values (MatMul,
Transpose, Reshape): fourteen nodes and the (B, heads, T, T) tensors between them. ONNX Runtime's
Attention node takes the layer's input, the three projections' weights side by side and the raw
attention mask, and does it all in one kernel; `quantize_dynamic` turns it into QAttention. ONNX
Runtime's own fuser (onnxruntime.transformers) does not recognise the exporter's pattern.

Measured on MiniLM (SST-2 dev x4, batches of 32 sorted by length, model time, medians of 3): int8
graph 3.22 s -> 2.83 s, fp32 graph 8.20 s -> 7.83 s. A layer whose nodes are not exactly this pattern
is left as it is (still correct); export says how many layers were rewritten, and checks the graph's
outputs against the model's before writing it.
"""

from __future__ import annotations

from collections import defaultdict

MASK_INT32 = "bertcli_attention_mask_int32"


class NoMatch(Exception):
    pass


def fuse_attention(model, num_heads: int) -> int:
    """Rewrite each layer's attention in the onnx ModelProto `model` in place; returns how many were."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    weights = {t.name: t for t in graph.initializer}

    def parent(node, index: int, op: str):
        found = producer.get(node.input[index]) if index < len(node.input) else None
        if found is None or found.op_type != op:
            raise NoMatch
        return found

    def only_reader(node, op: str):
        found = readers.get(node.output[0], [])
        if len(found) != 1 or found[0].op_type != op:
            raise NoMatch
        return found[0]

    def constant(name: str):
        if name not in weights:
            raise NoMatch
        return numpy_helper.to_array(weights[name])

    def perm(node) -> list[int]:
        return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), [])

    def projection(transpose, wanted_perm):
        """(layer input, weight (H, H), bias (H,), its nodes) of Transpose <- Reshape <- Add(MatMul(x, W), b)."""
        if perm(transpose) != wanted_perm:
            raise NoMatch
        reshape = parent(transpose, 0, "Reshape")
        add = parent(reshape, 0, "Add")
        matmul = parent(add, 0, "MatMul")
        return matmul.input[0], constant(matmul.input[1]), constant(add.input[1]), [transpose, reshape, add, matmul]

    fused, removed, in_place = 0, set(), {}  # in_place: id of a layer's last node -> the nodes that take its place
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        try:
            masked = parent(softmax, 0, "Add")
            scaled = parent(masked, 0, "Mul")
            scores = parent(scaled, 0, "MatMul")
            mixed = only_reader(softmax, "MatMul")
            merged = only_reader(mixed, "Transpose")
            output = only_reader(merged, "Reshape")
            x, wq, bq, q_nodes = projection(parent(scores, 0, "Transpose"), [0, 2, 1, 3])
            xk, wk, bk, k_nodes = projection(parent(scores, 1, "Transpose"), [0, 2, 3, 1])
            xv, wv, bv, v_nodes = projection(parent(mixed, 1, "Transpose"), [0, 2, 1, 3])
            scale = constant(scaled.input[1])
            hidden = wq.shape[-1]
            if x != xk or x != xv or perm(merged) != [0, 2, 1, 3] or scale.size != 1 or wq.ndim != 2 or \
                    hidden % num_heads or any(w.shape != wq.shape for w in (wk, wv)) or \
                    any(b.shape != (hidden,) for b in (bq, bk, bv)) or \
                    _inputs_above(masked.input[1], producer) != {"attention_mask"}:
                raise NoMatch  # (the Add must add the attention mask's bias alone: the node reads the mask itself)
            layer = [output, merged, mixed, softmax, masked, scaled, scores, *q_nodes, *k_nodes, *v_nodes]
            inside = {id(n) for n in layer}
            if any(id(reader) not in inside for n in layer if n is not output for out in n.output
                   for reader in readers.get(out, [])):
                raise NoMatch  # a tensor of the layer's attention is read elsewhere too: it must stay
        except NoMatch:
            continue
        prefix = f"bertcli_attention_{fused}"
        graph.initializer.extend([numpy_helper.from_array(np.concatenate([wq, wk, wv], 1), prefix + "_weight"),
                                  numpy_helper.from_array(np.concatenate([bq, bk, bv]), prefix + "_bias")])
        cast = [helper.make_node("Cast", ["attention_mask"], [MASK_INT32], to=TensorProto.INT32,
                                 name="bertcli_attention_mask_cast")] if not fused else []
        in_place[id(output)] = cast + [helper.make_node(
            "Attention", [x, prefix + "_weight", prefix + "_bias", MASK_INT32], [output.output[0]], name=prefix,
            domain="com.microsoft", num_heads=num_heads, scale=float(scale.reshape(-1)[0]))]
        removed.update(inside)
        fused += 1
    if fused:  # each Attention node where its layer's output was made: after what it reads, before its readers
        nodes = [new for n in graph.node for new in in_place.get(id(n), [] if id(n) in removed else [n])]
        del graph.node[:]
        graph.node.extend(_alive(nodes, {o.name for o in graph.output}))
        used = {name for n in graph.node for name in n.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def _inputs_above(name: str, producer: dict) -> set[str]:
    """The graph inputs that the tensor `name` is computed from (initializers and constants count for none)."""
    found, stack, seen = set(), [name], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        node = producer.get(current)
        if node is None:
            found.add(current)
        else:
            stack.extend(node.input)
    return found & {"input_ids", "attention_mask", "token_type_ids"}


def _alive(nodes: list, outputs: set[str]) -> list:
    """The nodes that the graph's outputs depend on (what the rewrite left unread goes)."""
    producer = {out: node for node in nodes for out in node.output}
    needed, stack = set(), list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    return [n for n in nodes if id(n) in needed]

