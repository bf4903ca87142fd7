"""--txt-loss-scale weighs the caption's targets where the caption is the condition (text->image,
super-resolution), never where it is what the model learns to write (the caption direction)."""
import torch

from megatron_t2i.data.loader import collate
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.training.objectives import TokenCrossEntropy

LAYOUT = TokenLayout(num_image_codes=16, num_text_tokens=20, image_grid=2, max_text_tokens=6)
TEXT, CODES = [3, 4, 5], [1, 2, 3, 4]


def test_text_loss_scale_applies_to_caption_first_sequences_only():
    t2i = LAYOUT.template("text_to_image", TEXT, CODES)
    i2t = LAYOUT.template("image_to_text", TEXT, CODES)
    batch = collate([t2i, i2t])
    weights = TokenCrossEntropy(LAYOUT, 0.25).prepare(batch)["weights"]
    labels, mask = batch["labels"], batch["loss_mask"]
    is_image = labels < LAYOUT.num_image_codes
    # text->image: the 3 caption ids and the specials after them are scaled, the codes are not
    assert torch.equal(weights[0], torch.where(is_image[0], 1.0, 0.25) * mask[0])
    assert (weights[0][is_image[0]] == 1).sum() == len(CODES)
    assert (weights[0] == 0.25).sum() >= len(TEXT)
    # the caption direction: every target keeps its loss-mask weight, its caption ids included
    assert torch.equal(weights[1], mask[1])
    text_targets = (labels[1] >= LAYOUT.text_offset) & (labels[1] < LAYOUT.text_offset + 20)
    assert text_targets.sum() == len(TEXT) and (weights[1][text_targets] == 1).all()
