"""Attribute binding by likelihood: the swap test.

A model can know which colours a two-shape caption names without knowing which shape has which:
"a yellow star ... and a blue square ..." against "a blue star ... and a yellow square ...". The
swap test asks the model itself, on held-out two-shape pictures whose shapes differ in the
attribute: is log p(picture | caption) higher with the true caption than with the caption whose
two words for the attribute are swapped (text->image)? And log p(caption | picture) (the caption
direction, which reranking uses)? Chance is 0.5 for each.

The pairs are split by caption order: "named in reading order" when the caption first names the
shape whose cell comes first row by row (the order in which the codes of the cells are generated,
up to two shapes in one row of cells), "named in reverse" otherwise. A model that binds by order
(the first colour named goes to the first shape drawn) scores near 1 on the first and near 0 on
the second; binding by content scores high on both.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from megatron_t2i.data.synthetic import ZH

ATTRIBUTES = ("colour", "kind")
ORDERS = ("named in reading order", "named in reverse")
DIRECTIONS = ("text->image", "image->text")
# (codes [N, grid^2], N lists of text ids) -> log-likelihoods [N]
Scorer = Callable[[torch.Tensor, list], torch.Tensor]


def swapped_caption(caption: str, attributes: dict, attribute: str) -> str | None:
    """The caption with the two shapes' words for `attribute` exchanged, or None when it has
    not two shapes, both have the same value, or a word is not named exactly once."""
    shapes = attributes.get("shapes", [])
    if len(shapes) != 2 or shapes[0][attribute] == shapes[1][attribute]:
        return None
    chinese = attributes.get("language") == "zh"
    words = [ZH[s[attribute]] if chinese else s[attribute] for s in shapes]
    # English words end at word boundaries ("red" is not part of another word); Chinese has none
    patterns = [re.escape(w) if chinese else rf"\b{re.escape(w)}\b" for w in words]
    if any(len(re.findall(p, caption)) != 1 for p in patterns):
        return None
    other = {words[0]: words[1], words[1]: words[0]}
    return re.sub("|".join(patterns), lambda m: other[m.group(0)], caption)


def named_in_reading_order(attributes: dict) -> bool:
    """Does the caption name first the shape whose cell comes first, row by row?"""
    first, second = attributes["shapes"]
    return (first["row"], first["col"]) < (second["row"], second["col"])


def swap_test(examples: list[dict], codes: torch.Tensor, encode: Callable[[str], list],
              image_given_text: Scorer, text_given_image: Scorer | None) -> dict:
    """examples [{"caption", "attributes"}] with their pictures' codes [N, grid^2] ->
    {attribute: {"pairs": {order: n}, "text->image": {order: share of pairs where the true
    caption wins}, "image->text": {...}}}. encode: caption -> text ids. text_given_image None:
    a model with no image->text direction, whose results have text->image only."""
    out = {}
    for attribute in ATTRIBUTES:
        chosen = [(i, swapped_caption(e["caption"], e["attributes"], attribute))
                  for i, e in enumerate(examples)]
        chosen = [(i, s) for i, s in chosen if s is not None]
        result = {"pairs": {order: 0 for order in ORDERS}}
        if not chosen:
            out[attribute] = result
            continue
        index = torch.tensor([i for i, _ in chosen])
        true_ids = [encode(examples[i]["caption"]) for i, _ in chosen]
        swapped_ids = [encode(s) for _, s in chosen]
        orders = [ORDERS[0] if named_in_reading_order(examples[i]["attributes"]) else ORDERS[1]
                  for i, _ in chosen]
        for order in orders:
            result["pairs"][order] += 1
        for direction, scorer in zip(DIRECTIONS, (image_given_text, text_given_image)):
            if scorer is None:
                continue
            wins = scorer(codes[index], true_ids) > scorer(codes[index], swapped_ids)   # [n]
            result[direction] = {
                order: (sum(bool(w) for w, o in zip(wins, orders) if o == order)
                        / result["pairs"][order]) if result["pairs"][order] else float("nan")
                for order in ORDERS}
        out[attribute] = result
    return out
