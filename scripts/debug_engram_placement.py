"""GPU check: do device and host Engram placements build identical weights and give identical tokens with
--load-format dummy (the bench engram setup), at a small size? Prints where they first differ."""
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, ".")
from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.memory.engram import engram_modules  # noqa: E402
from tierserve.memory.engram_config import EngramConfig  # noqa: E402

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"
cfg = json.loads(Path("tierserve/assets/configs/llama-3.1-8b/config.json").read_text())
cfg.update(num_hidden_layers=4, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
           num_key_value_heads=2, head_dim=64)
cfg["engram"] = EngramConfig(layers=(1, 2), heads_per_order=8, dim_per_head=64, table_size=20011).to_dict()
prompts = [list(range(5, 300)), list(range(1000, 1400, 3))]
sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "config.json").write_text(json.dumps(cfg))
    res = {}
    for placement in ("device", "cpu"):
        for eager in ((True, False) if DEV == "cuda" else (True,)):
            llm = LLM(tmp, load_format="dummy", device=DEV, dtype="bfloat16", engram_placement=placement,
                      enforce_eager=eager, enable_prefix_caching=False, max_model_len=1024)
            m = llm.engine.runner.model
            tabs = [e.table.storage()["weight"].detach().cpu().float() for e in engram_modules(m).values()]
            back = {n: p.detach().float().cpu() for n, p in m.named_parameters() if ".engram." not in n}
            toks = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
            res[(placement, eager)] = (tabs, back, toks)
            del llm, m
            if DEV == "cuda":
                torch.cuda.empty_cache()
    ref = res[("device", True)]
    for key, (tabs, back, toks) in res.items():
        same_t = all(torch.equal(a, b) for a, b in zip(tabs, ref[0]))
        diff_b = [n for n in back if not torch.equal(back[n], ref[1][n])]
        print(key, "tables equal:", same_t, "| backbone params differing:", diff_b[:3], len(diff_b),
              "| tokens equal:", toks == ref[2], "| first tokens", toks[0][:6])
