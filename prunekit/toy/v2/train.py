"""Train the toy LLaVA on the synthetic task from a seed: ``python -m prunekit.toy.train``.

Runs on a CPU (2 cores; docs/toy.md gives the time and the held-out accuracy of the shipped weights). Writes
config, weights (safetensors), tokenizer and processor to ``--out`` (default: the package's weights folder), and a
resumable checkpoint (model, optimizer, schedule and data state) to ``--checkpoint`` at every evaluation:
``--resume`` continues from it and reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

from prunekit.toy import training as toy_training
from prunekit.toy.training import answer_loss
from prunekit.toy.v2.model import WEIGHTS_DIR, build_config, build_processor
from prunekit.toy.v2.task import GRID, N_PATCH_CLASSES, ToyTask, Turn, description, patch_labels, prompt

N_CLASSES = N_PATCH_CLASSES  # background, or one size-colour-shape triple
PATCH_ROW = torch.arange(GRID).repeat_interleave(GRID)[None]  # [1, GRID*GRID] row of each patch
PATCH_COLUMN = torch.arange(GRID).repeat(GRID)[None]  # [1, GRID*GRID] column of each patch
READING_LAYERS = (10, 13)  # decoder layers whose first READING_HEADS heads learn where each answer's evidence lies
READING_HEADS = 2
LATE_FROM = 7  # before this layer (TransPrune's first stage) the question is taught not to read the image


# Evaluation batches, the per-sample loss and the held-out accuracy are the first toy's, on this task's prompt.
make_batch = partial(toy_training.make_batch, task_prompt=prompt, task_description=description)
accuracy = partial(toy_training.accuracy, make=make_batch)


def conversation_batch(processor, questions, follow_ups: list[list[Turn]], describe: list[bool]) -> dict:
    """Training batches: LLaVA-1.5 multi-turn conversations on one image, labels on every answer.

    Sample i is ``<s> USER: <image>\n{q} ASSISTANT: {a} </s> USER: {q2} ASSISTANT: {a2} </s> ...`` with the
    turns of ``follow_ups[i]``, or the describe task when ``describe[i]``. The first turn is exactly the
    evaluation prompt; later turns give one image several answers' worth of signal for little compute (an
    answer costs ~15 tokens, the image 144).
    """
    texts = []
    for question, turns, describing in zip(questions, follow_ups, describe):
        if describing:
            texts.append(f"{prompt('describe ?')} {description(question.shapes)} </s>")
            continue
        text = f"{prompt(question.question)} {question.answer} </s>"
        texts.append(text + "".join(f" USER: {t.question} ASSISTANT: {t.answer} </s>" for t in turns))
    batch = processor(images=[q.image for q in questions], text=texts, return_tensors="pt", padding=True)
    ids = batch["input_ids"]  # [batch, seq], left-padded
    tokenizer = processor.tokenizer
    opens = (ids == tokenizer.convert_tokens_to_ids("ASSISTANT:")).long()
    closes = (ids == tokenizer.eos_token_id).long()
    # A token is an answer token when more ASSISTANT: than </s> come before it: the answer words and their </s>.
    in_answer = (opens.cumsum(1) - opens) > (closes.cumsum(1) - closes)  # [batch, seq]
    batch["labels"] = torch.where(in_answer, ids, torch.full_like(ids, -100))
    return batch


def aux_loss(aux_head: torch.nn.Module, features: torch.Tensor, questions) -> torch.Tensor:
    """Dense patch targets on the projected image tokens: what covers each patch (size, colour, shape),
    whether it holds an object's centre, and its row and column.

    features: [batch, GRID*GRID, hidden]. Training only: the head is not part of the shipped model.
    """
    targets = [patch_labels(q.shapes) for q in questions]
    labels = torch.as_tensor(np.stack([t[0] for t in targets]))  # [batch, GRID*GRID]
    centers = torch.as_tensor(np.stack([t[1] for t in targets])).float()  # [batch, GRID*GRID]
    predicted = aux_head(features)  # [batch, GRID*GRID, classes + 2 * GRID + 1]
    batch = len(questions)
    ce = torch.nn.functional.cross_entropy
    rows = predicted[..., N_CLASSES:N_CLASSES + GRID].flatten(0, 1)
    columns = predicted[..., N_CLASSES + GRID:N_CLASSES + 2 * GRID].flatten(0, 1)
    return (ce(predicted[..., :N_CLASSES].flatten(0, 1), labels.flatten())
            + torch.nn.functional.binary_cross_entropy_with_logits(predicted[..., -1], centers)
            + 0.5 * ce(rows, PATCH_ROW.expand(batch, -1).flatten())
            + 0.5 * ce(columns, PATCH_COLUMN.expand(batch, -1).flatten()))


def attention_losses(attentions: tuple[torch.Tensor, ...], input_ids: torch.Tensor, image_token_id: int,
                     answer_open_id: int, relevant: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-only shaping of where the decoder reads the image (the shipped model stays a plain LLaVA).

    ``attentions``: per decoder layer ``[batch, heads, seq, seq]`` (eager attention); ``relevant[row]``: the
    relevant patches of each of the row's turns, in order (empty for a row without questions). Returns

    - ``reading``: -log of the attention mass that each turn's ``ASSISTANT:`` token puts on the turn's relevant
      patches, in the first ``READING_HEADS`` heads of each ``READING_LAYERS`` layer, averaged: the answer
      token learns where the evidence lies, late in the decoder as in LLaVA-1.5, where the instruction reads
      the image late;
    - ``early``: the mean attention mass that text tokens after the image put on the image in layers before
      ``LATE_FROM``: the evidence stays in the image tokens until the layers where pruning criteria act.
    """
    is_image = input_ids == image_token_id  # [batch, seq]
    after_image = (is_image.long().cumsum(1) > 0) & ~is_image  # [batch, seq] text after the image
    image_mass = [(a * is_image[:, None, None, :]).sum(-1) for a in attentions]  # per layer [batch, heads, seq]
    early = torch.stack([(m.mean(1) * after_image).sum() / after_image.sum().clamp(min=1)
                         for m in image_mass[:LATE_FROM]]).mean()
    terms = []
    for row, turns in enumerate(relevant):
        if not turns:
            continue
        image_positions = is_image[row].nonzero().squeeze(1)  # [GRID*GRID] patch k at image_positions[k]
        openers = (input_ids[row] == answer_open_id).nonzero().squeeze(1)  # [turns]
        for opener, patches in zip(openers.tolist(), turns):
            keys = image_positions[torch.as_tensor(patches, dtype=torch.long)]  # [relevant]
            for layer in READING_LAYERS:
                mass = attentions[layer][row, :READING_HEADS, opener, keys].sum(-1)  # [heads]
                terms.append(-torch.log(mass + 1e-6))
    reading = torch.cat(terms).mean() if terms else early.new_zeros(())
    return reading, early


def pretrain_vision(model, aux_head, captured: dict, task: ToyTask, steps: int, batch_size: int, lr: float) -> None:
    """Stage 1: the vision tower and projector alone learn the dense patch targets (cheap: no decoder)."""
    image_processor = build_processor().image_processor
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *aux_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    bar = tqdm(range(steps), desc="stage 1: vision tower", unit="step", mininterval=10)
    for _ in bar:
        questions = task.questions(batch_size)
        pixels = image_processor([q.image for q in questions], return_tensors="pt")["pixel_values"]
        model.model.get_image_features(pixel_values=pixels)  # the projector hook captures its output
        loss = aux_loss(aux_head, captured["features"], questions)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # share of patches whose covering object (or background) the head names right
            labels = torch.as_tensor(np.stack([patch_labels(q.shapes)[0] for q in questions]))  # [batch, GRID*GRID]
            named = (aux_head(captured["features"])[..., :N_CLASSES].argmax(-1) == labels).float().mean()
        bar.set_postfix(aux=f"{loss.item():.3f}", patches=f"{named.item():.3f}")


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, eval_every: int, threads: int | None,
          aux_weight: float = 0.5, vision_steps: int = 0, describe_every: int = 0, checkpoint: Path | None = None,
          resume: bool = False, turns: int = 5, reading_weight: float = 0.5, early_weight: float = 1.0) -> float:
    """Train from ``seed``; with ``resume``, continue from ``checkpoint`` (written at every evaluation)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    processor = build_processor()
    model = LlavaForConditionalGeneration(build_config())
    if reading_weight > 0 or early_weight > 0:
        model.set_attn_implementation("eager")  # training reads attention probabilities; the saved config keeps sdpa
    answer_open = processor.tokenizer.convert_tokens_to_ids("ASSISTANT:")
    task = ToyTask(seed)
    held_out = ToyTask(seed + 10_000).questions(500)
    # Training only: a linear head on the projected image tokens predicts what covers each patch and where it is.
    aux_head = torch.nn.Linear(model.config.text_config.hidden_size, N_CLASSES + 2 * GRID + 1)
    captured: dict = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.update(features=out))
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(aux_head.parameters()), lr=lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    warmup = max(1, steps // 50)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    first_step = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        aux_head.load_state_dict(state["aux_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        task.rng.setstate(state["task_rng"])
        torch.set_rng_state(state["torch_rng"])
        first_step = state["step"]
        tqdm.write(f"resumed from {checkpoint} at step {first_step}")
    model.train()
    if vision_steps and first_step == 0:
        pretrain_vision(model, aux_head, captured, task, vision_steps, 2 * batch_size, lr)
    start = time.time()
    best = 0.0
    bar = tqdm(range(first_step, steps), desc="training the toy LLaVA", unit="step", initial=first_step, total=steps,
               mininterval=10)
    for step in bar:
        questions = task.questions(batch_size)
        describe = [describe_every > 0 and i % describe_every == 1 for i in range(batch_size)]
        follow_ups = [[] if d else task.follow_ups(q, turns - 1) for q, d in zip(questions, describe)]
        batch = conversation_batch(processor, questions, follow_ups, describe)
        labels = batch.pop("labels")
        outputs = model(**batch, output_attentions=reading_weight > 0 or early_weight > 0)
        loss = answer_loss(outputs.logits, labels)
        aux = aux_loss(aux_head, captured["features"], questions)
        total = loss + aux_weight * aux
        if reading_weight > 0 or early_weight > 0:
            relevant = [[] if d else [q.relevant] + [t.relevant for t in turns]
                        for q, turns, d in zip(questions, follow_ups, describe)]
            reading, early = attention_losses(outputs.attentions, batch["input_ids"], model.config.image_token_id,
                                              answer_open, relevant)
            total = total + reading_weight * reading + early_weight * early
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        postfix = {"loss": f"{loss.item():.3f}", "aux": f"{aux.item():.3f}"}
        if reading_weight > 0 or early_weight > 0:
            postfix.update(reading=f"{reading.item():.3f}", early=f"{early.item():.3f}")
        bar.set_postfix(postfix)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            kinds: dict[str, float] = {}
            best = accuracy(model, processor, held_out, by_kind=kinds)
            model.save_pretrained(out)  # the latest weights at every evaluation
            processor.save_pretrained(out)
            if checkpoint is not None:
                torch.save({"model": model.state_dict(), "aux_head": aux_head.state_dict(),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "task_rng": task.rng.getstate(), "torch_rng": torch.get_rng_state(), "step": step + 1},
                           checkpoint)
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the shipped weights: 1)")
    parser.add_argument("--vision-steps", type=int, default=1200, help="stage 1: vision tower on patch targets")
    parser.add_argument("--checkpoint", type=Path, default=Path("toy-train.ckpt"),
                        help="resumable training state, written at every evaluation")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--turns", type=int, default=5, help="questions per training conversation (one image)")
    parser.add_argument("--reading-weight", type=float, default=0.5,
                        help=f"weight of the loss teaching layers {READING_LAYERS} to read each answer's relevant "
                             "patches")
    parser.add_argument("--early-weight", type=float, default=1.0,
                        help=f"weight of the loss keeping the question from reading the image before layer "
                             f"{LATE_FROM}")
    parser.add_argument("--describe-every", type=int, default=0,
                        help="every n-th sample of a batch is the describe task (0: questions only)")
    args = parser.parse_args(argv)
    accuracy_ = train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every, args.threads,
                      vision_steps=args.vision_steps, checkpoint=args.checkpoint, resume=args.resume,
                      describe_every=args.describe_every, turns=args.turns, reading_weight=args.reading_weight,
                      early_weight=args.early_weight)
    print(f"held-out accuracy: {accuracy_:.3f}; weights in {args.out}")


if __name__ == "__main__":
    main()
