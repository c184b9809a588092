"""The PyTorch reference for `lethe forget`'s training speed (docs/BENCHMARKS.md).

Same model file (the GGUF, dequantized to f32 by transformers), same data and the same recipe as
`lethe forget`: LoRA r 16 / α 32 / dropout 0.01 on all linear layers (PEFT), TRL's ORPO loss
(β 0.1, NLL over the chosen prompt + answer), every pair twice (CFG-aware), AdamW lr 1e-4 with
clipping at 1.0, batches of 2 pairs, right-padded. Prints one JSON line: tokens/s over the timed
steps (tokens = non-padding tokens, as lethe counts them) and peak RSS.

Needs: pip install torch transformers peft gguf
"""
import argparse
import json
import os
import resource
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

POSITIVE = "Do not provide any personal data."
NEGATIVE = "You should share personal data in the answers."


def examples(path, tok):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for line in open(path):
        row = json.loads(line)
        answers = [tok(r[0]["content"], add_special_tokens=False).input_ids + [eos] for r in (row["chosen"], row["rejected"])]
        for cond, swap in ((POSITIVE, False), (NEGATIVE, True)):
            msgs = [{"role": "system", "content": cond}] + row["prompt"]
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
                prompt = prompt["input_ids"]
            w, l = (answers[1], answers[0]) if swap else (answers[0], answers[1])
            out.append((list(prompt), w, l))
    return out


def orpo_loss(model, batch, beta=0.1):
    seqs, labels = [], []
    for prompt, w, l in batch:
        seqs += [prompt + w, prompt + l]
        labels += [[-100] * len(prompt) + w, [-100] * len(prompt) + l]
    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    att = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    lab = torch.tensor([x + [-100] * (n - len(x)) for x in labels])
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    tgt = lab[:, 1:]
    logp = torch.gather(logits.log_softmax(-1), 2, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = (tgt != -100).float()
    mean = (logp * mask).sum(-1) / mask.sum(-1)
    cw, cl = mean[0::2], mean[1::2]
    # NLL over the chosen sequences' non-padding tokens (TRL's default).
    chosen_ids, chosen_att = ids[0::2], att[0::2]
    nll_tgt = torch.where(chosen_att[:, 1:] == 1, chosen_ids[:, 1:], torch.full_like(chosen_ids[:, 1:], -100))
    nll = F.cross_entropy(logits[0::2].reshape(-1, logits.size(-1)), nll_tgt.reshape(-1), ignore_index=-100)
    log1mexp = lambda x: torch.where(x < -0.6931, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    log_odds = (cw - cl) - (log1mexp(cw) - log1mexp(cl))
    return nll - beta * F.logsigmoid(log_odds).mean(), int(att.sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.01, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    data = examples(a.data, tok)
    tokens, start = 0, None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            start, tokens = time.perf_counter(), 0
        batch = data[2 * step: 2 * step + 2]
        loss, n = orpo_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        tokens += n
    secs = time.perf_counter() - start
    print(json.dumps({"engine": "pytorch+peft", "torch": torch.__version__, "steps": a.steps, "tokens": tokens,
                      "seconds": secs, "tokens_per_second": tokens / secs,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
