"""What both toys' trainers share: prompt-and-answer batches, the per-sample answer loss and greedy accuracy."""

from __future__ import annotations

import torch

from prunekit.toy.task import description, prompt


def make_batch(processor, questions, with_answers: bool = True, describe: list[bool] | None = None,
               task_prompt=prompt, task_description=description) -> dict:
    """Prompts (and, for training, answers with labels on the answer tokens only).

    ``describe[i]`` turns sample i into the description task: ``describe ?`` answered with every
    object's colour, shape and column, a dense signal that teaches the model to read the image.
    """
    describe = describe or [False] * len(questions)
    prompts = [task_prompt("describe ?" if d else q.question) for q, d in zip(questions, describe)]
    answers = [task_description(q.shapes) if d else q.answer for q, d in zip(questions, describe)]
    texts = [p + (f" {a} </s>" if with_answers else "") for p, a in zip(prompts, answers)]
    batch = processor(images=[q.image for q in questions], text=texts, return_tensors="pt", padding=True)
    if with_answers:
        labels = torch.full_like(batch["input_ids"], -100)
        for row, answer in enumerate(answers):
            n = len(answer.split()) + 1  # the answer words and </s> end every row (left padding)
            labels[row, -n:] = batch["input_ids"][row, -n:]
        batch["labels"] = labels
    return batch


def per_sample_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy averaged over each sample's answer tokens, then over samples.

    A one-word answer then weighs as much as a ten-token description (a token average would let
    the descriptions drown the questions).
    """
    labels = batch.pop("labels")
    return answer_loss(model(**batch).logits, labels)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`per_sample_loss` on a forward's logits (``[batch, seq, vocab]``) and labels (``[batch, seq]``)."""
    logits = logits[:, :-1]  # [batch, seq - 1, vocab] predicts tokens 1..
    target = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(),
                                                   ignore_index=-100, reduction="none").view_as(target)
    counted = (target != -100).float()
    return ((token_loss * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)).mean()


@torch.no_grad()
def accuracy(model, processor, questions, batch_size: int = 64, by_kind: dict | None = None,
             make=make_batch) -> float:
    """Greedy one-token answers against the truth (``by_kind`` receives the accuracy per question kind)."""
    results = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        batch = make(processor, chunk, with_answers=False)
        logits = model(**batch).logits[:, -1]
        words = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        results += [(q.kind, w == q.answer) for w, q in zip(words, chunk)]
    if by_kind is not None:
        for kind in sorted({k for k, _ in results}):
            oks = [ok for k, ok in results if k == kind]
            by_kind[kind] = sum(oks) / len(oks)
    return sum(ok for _, ok in results) / len(results)
