"""TRL's ORPOTrainer loss and metrics, re-implemented with numpy from the sequences alone.

Input (JSON file, argv[1]): {"beta", "nll_on": "all"|"completion", "sequences": [...]}, the
sequences in (chosen, rejected) order per pair, each {"ids", "completion", "logps"} where
logps[i] = log p(ids[i+1] | ids[:i+1]). Prints the metrics under TRL's names.

Follows trl.trainer.orpo_trainer.ORPOTrainer: labels are the completion tokens (prompt masked
with -100); get_batch_logps(average_log_prob=True) averages the labelled tokens' log-probs of a
sequence; the NLL is CrossEntropyLoss over the chosen sequences' shifted input ids (every token
after the first, or the completion only); odds_ratio_loss with log1mexp written stably.
"""
import json
import sys

import numpy as np


def log1mexp(x):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x < -np.log(2.0), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def main():
    d = json.load(open(sys.argv[1]))
    beta = d["beta"]
    seqs = d["sequences"]
    chosen, rejected = seqs[0::2], seqs[1::2]

    def avg_logp(s):
        lp = np.asarray(s["logps"], dtype=np.float64)
        labels = np.asarray(s["completion"][1:], dtype=bool)  # shifted: logps[i] predicts ids[i+1]
        return lp[labels].sum() / labels.sum()

    cw = np.array([avg_logp(s) for s in chosen])
    cl = np.array([avg_logp(s) for s in rejected])
    # CrossEntropyLoss(mean) over the chosen sequences' tokens after the first.
    nll_terms = []
    for s in chosen:
        lp = np.asarray(s["logps"], dtype=np.float64)
        mask = np.ones(len(lp), dtype=bool) if d["nll_on"] == "all" else np.asarray(s["completion"][1:], dtype=bool)
        nll_terms.extend(-lp[mask])
    nll = float(np.mean(nll_terms))
    log_odds = (cw - cl) - (log1mexp(cw) - log1mexp(cl))
    ratio = log_sigmoid(log_odds)
    losses = beta * ratio
    chosen_rewards, rejected_rewards = beta * cw, beta * cl
    out = {
        "loss": nll - float(np.mean(losses)),
        "nll_loss": nll,
        "log_odds_ratio": float(np.mean(ratio)),
        "log_odds_chosen": float(np.mean(log_odds)),
        "logps/chosen": float(np.mean(cw)),
        "logps/rejected": float(np.mean(cl)),
        "rewards/chosen": float(np.mean(chosen_rewards)),
        "rewards/rejected": float(np.mean(rejected_rewards)),
        "rewards/margins": float(np.mean(chosen_rewards - rejected_rewards)),
        "rewards/accuracies": float(np.mean((chosen_rewards > rejected_rewards).astype(np.float64))),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
