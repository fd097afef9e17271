"""Which decode graphs a step replays (ModelRunner._graph_kind), on stand-ins: CPU-testable routing of the
plain graphs, the set captured with the tiers' spill stores, and eager steps."""
from types import SimpleNamespace as NS

import pytest

from tierserve.runner.model_runner import ModelRunner


class Graphs:
    def __init__(self, spill=None, spill_graphs=None, engram=None):
        self.spill, self.spill_graphs, self.engram = spill, spill_graphs or {}, engram

    def bucket_for(self, bs):
        return 8 if bs <= 8 else None


def kind(graphs, host_kv=None, host_ram_only=False, sparse=None, spill=None, decode_only=True, bs=1, plp=None,
         engram_hasher=None):
    runner = NS(graphs=graphs, sparse=sparse, spill=spill, engram_hasher=engram_hasher)
    meta = NS(decode_only=decode_only, num_seqs=bs, host_kv=host_kv, host_ram_only=host_ram_only)
    return ModelRunner._graph_kind(runner, meta, plp)


SPILL = Graphs(spill=object(), spill_graphs={8: object()})


@pytest.mark.parametrize("graphs,kw,want", [
    (None, {}, None),                                                   # no graphs (CPU, enforce_eager)
    (Graphs(), {}, "plain"),
    (Graphs(), {"decode_only": False}, None),                           # prefill in the step
    (Graphs(), {"bs": 9}, None),                                        # above the largest bucket
    (Graphs(), {"plp": [1]}, None),                                     # prompt logprobs
    (Graphs(), {"engram_hasher": object()}, None),                      # Engram rows the graphs cannot gather
    (SPILL, {"spill": object()}, "plain"),                              # a CPU tier, nothing spilled in the step
    (SPILL, {"spill": object(), "host_kv": [1], "host_ram_only": True}, "spill"),
    (SPILL, {"spill": object(), "host_kv": [1], "host_ram_only": False}, None),   # disk spill file: eager
    (Graphs(), {"spill": object(), "host_kv": [1], "host_ram_only": True}, None),  # spill set not captured
    (SPILL, {"spill": object(), "sparse": object()}, "spill"),          # sparse + tiers: counts in the graph
    (Graphs(spill=object()), {"spill": object(), "sparse": object()}, None),
])
def test_graph_kind(graphs, kw, want):
    assert kind(graphs, **kw) == want
