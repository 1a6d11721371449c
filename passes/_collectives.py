"""Stage attributes and explicit collectives for a sharded graph (helper of the `shard` pass).

- tp > 1: `all_reduce` after every row-parallel output (attention, dense MLP, the MoE block,
  the vocabulary-parallel embeddings), `all_gather` of the vocabulary-parallel logits. An
  unfused MoE block reduces once, after its routed and shared outputs are summed.
- ep > 1: `all_to_all` dispatch before and combine after every MoE (or experts) node.
- pp > 1: `send_recv` after the last layer of each stage but the last.
Every node, collectives included, carries its `stage`.
"""

from __future__ import annotations

from dataclasses import replace

from glmc.ir import (
    AllGatherAttrs,
    AllReduceAttrs,
    AllToAllAttrs,
    CollectiveAttrs,
    Graph,
    Node,
    Op,
    SendRecvAttrs,
)

MOE_OPS = (Op.MOE, Op.EXPERTS)


def insert_collectives(
    g: Graph, nodes: list[Node], stages: list[tuple[int, int]], ep: int, tp: int, pp: int
) -> list[Node]:
    return _Rewriter(g, stages, ep, tp, pp).run(nodes)


class _Rewriter:
    """Stage attrs on every node, collectives around the nodes that need them."""

    def __init__(self, g: Graph, stages: list[tuple[int, int]], ep: int, tp: int, pp: int) -> None:
        self.g, self.ep, self.tp, self.pp = g, ep, tp, pp
        self.n_layers = g.attrs.num_layers
        self.stage_of_layer = {layer: s for s, (a, b) in enumerate(stages) for layer in range(a, b + 1)}
        self.boundaries = {f"model.layers.{b}": s for s, (_, b) in enumerate(stages[:-1])}
        # Unfused MoE: the routed and shared outputs are summed by an add node named like the
        # block; that add carries the block's tensor-parallel all-reduce.
        self.moe_adds = {n.name for n in g.nodes if n.op is Op.ADD and g.has_node(f"{n.name}.experts")}

    def stage(self, n: Node) -> int:
        layer = n.attrs.layer
        if layer is not None:
            return self.stage_of_layer.get(layer, self.pp - 1)
        return 0 if n.name in ("input_ids", "model.embed_tokens") else self.pp - 1

    def run(self, nodes: list[Node]) -> list[Node]:
        out: list[Node] = []
        renamed: dict[str, str] = {}
        for n in nodes:
            if renamed:
                n = replace(n, inputs=tuple(renamed.get(i, i) for i in n.inputs))
            s = self.stage(n)
            n = n.with_attrs(stage=s)
            last = n.name
            if self.ep > 1 and n.op in MOE_OPS:
                dispatch = self._collective(
                    f"{n.name}.dispatch", n.inputs[0], n, AllToAllAttrs(axis="ep", kind="dispatch")
                )
                out.append(dispatch)
                inputs = (n.inputs[0], dispatch.name) if n.op is Op.MOE else (dispatch.name, *n.inputs[1:])
                n = replace(n, inputs=inputs)
                out.append(n)
                combine = AllToAllAttrs(axis="ep", kind="combine")
                out.append(self._collective(f"{n.name}.combine", n.name, n, combine))
                last = out[-1].name
            else:
                out.append(n)
            if self.tp > 1 and self._reduces(n):
                out.append(
                    self._collective(f"{n.name}.all_reduce", last, n, AllReduceAttrs(axis="tp", kind="sum"))
                )
                last = out[-1].name
            if self.tp > 1 and n.op is Op.LM_HEAD:
                gather = self._collective(
                    f"{n.name}.all_gather", last, n, AllGatherAttrs(axis="tp", kind="vocab", dim=-1)
                )
                out.append(gather)
                last = gather.name
            if n.name in self.boundaries:
                src = self.boundaries[n.name]
                out.append(
                    Node(
                        f"{n.name}.send",
                        Op.SEND_RECV,
                        (last,),
                        attrs=SendRecvAttrs(
                            axis="pp", kind="activations", src=src, dst=src + 1, stage=src + 1
                        ),
                    )
                )
                last = out[-1].name
            if last != n.name:
                renamed[n.name] = last
        return out

    def _reduces(self, n: Node) -> bool:
        if n.op in (Op.ATTENTION, Op.EMBED, Op.MOE):
            return True
        if n.op is Op.MLP:
            return not n.name.endswith(".shared_experts")  # summed with the routed output first
        if n.op is Op.EXPERTS:
            return n.name.removesuffix(".experts") not in self.moe_adds
        return n.op is Op.ADD and n.name in self.moe_adds

    @staticmethod
    def _collective(name: str, src: str, of: Node, attrs: CollectiveAttrs) -> Node:
        """`attrs`' collective on `src`, in the layer and stage of node `of`."""
        attrs = attrs.updated(layer=of.attrs.layer, stage=of.attrs.stage)
        assert attrs.op is not None
        return Node(name, attrs.op, (src,), attrs=attrs)
