"""Where a calibration-demo model keeps "will this answer be right?": linear-probe AUROC by position.

Reads a finished ``radialog-rl demo calibration --work DIR`` run, generates the (SFT, or
``--adapter``) model's greedy answers on the held-out rows, takes the last hidden state (the LM
head's input) at four positions of each response and prints the 5-fold cross-validated AUROC of a
logistic-regression probe for correctness, and how much that state varies between rows::

    python benchmarks/probe_positions.py runs/demo-calibration-full
    python benchmarks/probe_positions.py runs/demo-calibration-full --adapter runs/demo-calibration-full/ppo/final

Positions: the last prompt token, the answer token (first response token), the token before the
confidence digit (what the LM head reads to state the digit), the last response token.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from radialog_rl.calibration.rewards import row_accuracy
from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.training.ppo.trainer import PPOTrainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "calibration_ppo.yaml"
POSITIONS = ("last prompt token", "answer token", "token before the digit", "last response token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the demo's --work folder (sft/merged, task/)")
    parser.add_argument("--adapter", type=Path, help="a PPO export (adapter/ + value head) to probe instead of SFT")
    parser.add_argument("--out", type=Path, default=Path("/tmp/probe-positions-run"), help="scratch output_dir")
    args = parser.parse_args()
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg.update(llava_model_path=str(args.work / "sft/merged"), train_file=str(args.work / "task/ppo_train.jsonl"),
               eval_file=str(args.work / "task/ppo_eval.jsonl"), output_dir=str(args.out), overwrite=True, steps=1)
    if args.adapter:
        cfg.update(adapter_path=str(args.adapter / "adapter"), value_head_path=str(args.adapter))
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
            cfg.pop(key, None)  # a loaded adapter keeps its own shape
    trainer = PPOTrainer(PPOConfig(**cfg))
    features: dict[str, list[torch.Tensor]] = {p: [] for p in POSITIONS}
    labels: list[bool] = []
    with torch.no_grad():
        for start in range(0, len(trainer.eval_rows), 50):
            chunk = trainer.eval_rows[start : start + 50]
            _, query, image_features, response, mask, texts = trainer._sample(chunk, do_sample=False, max_new_tokens=24)
            ids = torch.cat([query.input_ids, response], 1)
            attention = torch.cat([query.attention_mask, mask.to(query.attention_mask.dtype)], 1)
            out = trainer.unwrapped.pretrained_model(input_ids=ids, attention_mask=attention,
                                                     image_features=image_features, output_hidden_states=True)
            hidden, q = out.hidden_states[-1].float(), query.input_ids.shape[1]
            for b, (row, text) in enumerate(zip(chunk, texts)):
                accuracy, _ = row_accuracy(row.fields, text)
                tokens = response[b][mask[b].bool()].tolist()
                digit = next((k for k in range(len(tokens))
                              if "confidence" in (piece := trainer.tokenizer.decode(tokens[: k + 1]))
                              and piece[-1:].isdigit()), None)
                if accuracy is None or digit is None:
                    continue
                labels.append(accuracy > 0.5)
                for name, position in zip(POSITIONS, (q - 1, q, q + digit - 1, q + len(tokens) - 1)):
                    features[name].append(hidden[b, position])
    y = np.array(labels)
    print(f"{len(y)} rows with an answer and a confidence, {y.mean():.1%} correct\n")
    print("| position | probe AUROC | hidden-state spread (mean per-dimension std) |")
    print("|---|---|---|")
    for name, rows in features.items():
        x = torch.stack(rows).numpy()
        p = cross_val_predict(LogisticRegression(max_iter=2000), x, y, cv=5, method="predict_proba")[:, 1]
        print(f"| {name} | {roc_auc_score(y, p):.3f} | {x.std(0).mean():.3f} |")


if __name__ == "__main__":
    main()
