"""Train a toy LLaVA on its synthetic task from a seed: ``python -m prunekit.toy.train`` (the default toy;
``--toy question-first`` for this module's, the first toy).

The question-first toy runs on a CPU (2 cores: about 70 minutes for its shipped weights, held-out accuracy
0.996). Writes config, weights (safetensors), tokenizer and processor to ``--out`` (default: the package's weights
folder).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

from prunekit.toy.model import WEIGHTS_DIR, build_config, build_processor
from prunekit.toy.task import COLORS, SHAPES, ToyTask, patch_labels
from prunekit.toy.training import accuracy, make_batch, per_sample_loss


PATCH_COLUMN = torch.tensor([(0 if c < 3 else 1 if c < 5 else 2) for _ in range(8) for c in range(8)])[None]


def pretrain_vision(model, aux_head, captured: dict, task: ToyTask, steps: int, batch_size: int, lr: float,
                    n_classes: int) -> None:
    """Stage 1: the vision tower and projector alone learn the dense patch targets (cheap: no decoder)."""
    from prunekit.toy.model import build_processor

    image_processor = build_processor().image_processor
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *aux_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    bar = tqdm(range(steps), desc="stage 1: vision tower", unit="step")
    for _ in bar:
        questions = task.questions(batch_size)
        pixels = image_processor([q.image for q in questions], return_tensors="pt")["pixel_values"]
        model.model.get_image_features(pixel_values=pixels)  # the projector hook captures its output
        labels = torch.as_tensor(np.stack([patch_labels(q.shapes) for q in questions]))
        predicted = aux_head(captured["features"])
        loss = torch.nn.functional.cross_entropy(predicted[..., :n_classes].flatten(0, 1), labels.flatten())
        loss = loss + torch.nn.functional.cross_entropy(predicted[..., n_classes:].flatten(0, 1),
                                                        PATCH_COLUMN.expand(len(questions), -1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(aux=f"{loss.item():.3f}")


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_every: int, threads: int | None,
          aux_weight: float = 0.5, vision_steps: int = 0) -> float:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    processor = build_processor()
    model = LlavaForConditionalGeneration(build_config())
    task = ToyTask(seed)
    held_out = ToyTask(seed + 10_000).questions(500)
    # Training only: a linear head on the projected image tokens predicts what covers each patch.
    # This dense target teaches the vision tower in minutes; the head is not part of the shipped model.
    n_classes = 1 + len(COLORS) * len(SHAPES)
    aux_head = torch.nn.Linear(model.config.text_config.hidden_size, n_classes + 3)  # class, and the patch's column
    captured = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.update(features=out))
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(aux_head.parameters()), lr=lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    warmup = max(1, steps // 50)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    if vision_steps:
        pretrain_vision(model, aux_head, captured, task, vision_steps, 2 * batch_size, lr, n_classes)
    start = time.time()
    best = 0.0
    bar = tqdm(range(steps), desc="training the toy LLaVA", unit="step")
    for step in bar:
        questions = task.questions(batch_size)
        batch = make_batch(processor, questions, describe=[i % 2 == 1 for i in range(batch_size)])
        loss = per_sample_loss(model, batch)
        labels = torch.as_tensor(np.stack([patch_labels(q.shapes) for q in questions]))  # [batch, 64]
        predicted = aux_head(captured["features"])  # [batch, 64, classes + 3]
        aux = torch.nn.functional.cross_entropy(predicted[..., :n_classes].flatten(0, 1), labels.flatten())
        aux = aux + torch.nn.functional.cross_entropy(predicted[..., n_classes:].flatten(0, 1),
                                                      PATCH_COLUMN.expand(len(questions), -1).flatten())
        (loss + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            kinds: dict[str, float] = {}
            best = accuracy(model, processor, held_out, by_kind=kinds)
            model.save_pretrained(out)  # a checkpoint at every evaluation
            processor.save_pretrained(out)
            model.train()
            detail = ", ".join(f"{k} {v:.2f}" for k, v in kinds.items())
            tqdm.write(f"step {step + 1}: held-out accuracy {best:.3f} ({detail}; {time.time() - start:.0f} s)")
    hook.remove()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return best


def main(argv: list[str] | None = None) -> None:
    """``python -m prunekit.toy.train [--toy NAME] ...``: train the default toy (``--toy llava``: the LLaVA-layout
    toy's trainer, :mod:`prunekit.toy.v2.train`, with its own options) or ``--toy question-first`` (this one)."""
    from prunekit.toy import DEFAULT_TOY, TOYS

    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--toy", choices=list(TOYS), default=DEFAULT_TOY)
    chosen, rest = chooser.parse_known_args(argv)
    if chosen.toy == "llava":
        from prunekit.toy.v2.train import main as train_llava_toy

        train_llava_toy(rest)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--toy", choices=list(TOYS), default=DEFAULT_TOY, help="which toy to train")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--vision-steps", type=int, default=3000, help="stage 1: vision tower on patch targets")
    args = parser.parse_args(rest)
    accuracy_ = train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every, args.threads,
                      vision_steps=args.vision_steps)
    print(f"held-out accuracy: {accuracy_:.3f}; weights in {args.out}")


if __name__ == "__main__":
    main()
