"""Checks a PEFT LoRA directory the way PEFT expects it, with `safetensors` and `json` only.

Usage: check_peft.py DIR --layers N --hidden H --kv KV --ffn F --rank R --modules q_proj,...
Exits non-zero with a message on the first problem.
"""
import argparse
import json
import os
import sys

from safetensors import safe_open


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--kv", type=int, required=True)
    ap.add_argument("--ffn", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--modules", required=True)
    a = ap.parse_args()
    modules = a.modules.split(",")

    cfg = json.load(open(os.path.join(a.dir, "adapter_config.json")))
    expect = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": a.rank, "bias": "none",
              "fan_in_fan_out": False, "use_dora": False}
    for k, v in expect.items():
        assert cfg.get(k) == v, f"adapter_config.json: {k} = {cfg.get(k)!r}, expected {v!r}"
    for k in ["lora_alpha", "lora_dropout", "use_rslora", "base_model_name_or_path", "target_modules"]:
        assert k in cfg, f"adapter_config.json lacks {k}"
    assert sorted(cfg["target_modules"]) == sorted(modules), cfg["target_modules"]

    h, kv, f, r = a.hidden, a.kv, a.ffn, a.rank
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
    path = os.path.join(a.dir, "adapter_model.safetensors")
    with safe_open(path, framework="numpy") as st:
        meta = st.metadata()
        assert meta is not None and meta.get("format") == "pt", f"metadata {meta!r}: needs format=pt"
        keys = set(st.keys())
        want = set()
        for layer in range(a.layers):
            for m in modules:
                block = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                base = f"base_model.model.model.layers.{layer}.{block}.{m}"
                inp, out = dims[m]
                for suffix, shape in ((".lora_A.weight", (r, inp)), (".lora_B.weight", (out, r))):
                    key = base + suffix
                    want.add(key)
                    assert key in keys, f"missing {key}"
                    t = st.get_tensor(key)
                    assert t.shape == shape, f"{key}: shape {t.shape}, expected {shape}"
                    assert str(t.dtype) == "float32", f"{key}: dtype {t.dtype}"
                    assert (t == t).all(), f"{key}: NaN"
        assert keys == want, f"unexpected keys: {sorted(keys - want)[:5]}"
    print(f"ok: {len(want)} tensors, config and metadata as PEFT expects")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"PEFT check failed: {e}", file=sys.stderr)
        sys.exit(1)
