"""Every Llama-family variant against Hugging Face transformers: greedy tokens and logprobs (fp32, CPU)."""
import pytest
import torch

from tests.helpers.tiny_models import FAMILIES, make_checkpoint
from tierserve import LLM, SamplingParams

NEW = 32


def hf_greedy(path, prompt_ids, n):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=2)
    toks = out.sequences[0, len(prompt_ids):].tolist()
    lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, toks)]
    return toks, lps


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(tmp_path, family):
    path = make_checkpoint(tmp_path / family, family)
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=256)
    prompts = [[0, 5, 17, 99, 250, 3, 42, 7, 300, 12, 8, 77, 401, 5, 9, 10, 11, 12, 13, 14, 15, 90],
               [0, 33, 44]]
    sp = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, sp)
    for p, out in zip(prompts, outs):
        toks, lps = hf_greedy(path, p, NEW)
        got = out.outputs[0]
        assert got.token_ids == toks
        ours = [lp[t] for lp, t in zip(got.logprobs, got.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, lps)) < 1e-4
