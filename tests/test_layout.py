import json

import pytest
import torch

from megatron_t2i.tokenizers.layout import SPECIALS, LayoutMismatchError, TokenLayout


def test_cogview_preset_ids_match_the_released_vocabulary():
    lay = TokenLayout.cogview()
    # REFERENCE.md: codes 0..8191, text 8192..58191, 27 commands from 58192 in a fixed order.
    assert lay.text_tokens([0, 49999]).tolist() == [8192, 58191]
    expected = {"[PAD]": 58192, "[BOI1]": 58193, "[BOI2]": 58194, "[BOI3]": 58195, "[EOI1]": 58196,
                "[EOI2]": 58197, "[EOI3]": 58198, "[ROI1]": 58199, "[ROI2]": 58200, "[ROI3]": 58201,
                "[SEP]": 58202, "[MASK]": 58203, "[CLS]": 58204, "[ENC]": 58205, "[TINY]": 58206,
                "[SMALL]": 58207, "[BASE]": 58208, "[BIG]": 58209, "[POS0]": 58210, "[POS8]": 58218}
    assert {k: lay[k] for k in expected} == expected
    assert lay.vocab_size == 58219 and len(SPECIALS) == 27
    assert lay.padded_vocab_size(1) == 58240
    assert lay.padded_vocab_size(2) % 256 == 0 and lay.padded_vocab_size(2) >= 58219
    assert lay.seq_length("text_to_image") == 1089


def test_text_to_image_template_matches_cogview():
    lay = TokenLayout.cogview()
    text = [5, 6, 7]
    codes = torch.arange(1024) % 8192
    seq = lay.text_to_image(text, codes)
    t = seq.tokens
    assert t.numel() == 1089
    assert t[0] == lay["[ROI1]"]
    assert t[1:4].tolist() == [8197, 8198, 8199]
    assert t[4] == lay["[BASE]"] and t[5] == lay["[BOI1]"]
    assert seq.image_start == 6 and torch.equal(t[6:1030], codes)
    assert t[1030] == lay["[EOI1]"] and (t[1031:] == lay["[PAD]"]).all()
    assert torch.equal(seq.position_ids, torch.arange(1089))
    # every non-pad token but the first is a target
    assert seq.loss_mask[0] == 0 and seq.loss_mask[1:1031].all() and not seq.loss_mask[1031:].any()


def test_prompt_is_a_prefix_of_the_training_sequence():
    lay = TokenLayout()
    codes = torch.randint(0, lay.num_image_codes, (lay.image_tokens,))
    full = lay.text_to_image([1, 2], codes)
    prompt = lay.text_to_image([1, 2])
    assert torch.equal(full.tokens[: prompt.tokens.numel()], prompt.tokens)
    assert prompt.image_start == prompt.tokens.numel()
    comp = lay.completion([1, 2], codes[:40])
    assert torch.equal(full.tokens[: comp.tokens.numel()], comp.tokens)
    with pytest.raises(ValueError, match="completion keeps"):
        lay.completion([1], codes)


def test_image_to_text_marks_end_of_caption():
    lay = TokenLayout()
    codes = torch.randint(0, lay.num_image_codes, (lay.image_tokens,))
    seq = lay.image_to_text(codes, [3, 4])
    t = seq.tokens
    assert t[0] == lay.size_token and t[1] == lay["[BOI1]"]
    assert t[2 + lay.image_tokens] == lay["[EOI1]"] and t[3 + lay.image_tokens] == lay["[ROI1]"]
    n = 4 + lay.image_tokens + 2
    assert lay.decode_text_ids(t) == [3, 4]
    assert t.numel() == lay.seq_length("image_to_text")
    assert seq.loss_mask[n] == 1 and t[n] == lay["[PAD]"]  # the first pad ends the caption
    assert not seq.loss_mask[n + 1:].any()
    prompt = lay.image_to_text(codes)
    assert torch.equal(t[: prompt.tokens.numel()], prompt.tokens)


def test_super_resolution_positions_restart_at_roi2():
    lay = TokenLayout(image_grid=16, image_positions="after_text")
    low = torch.randint(0, lay.num_image_codes, (64,))
    high = torch.randint(0, lay.num_image_codes, (256,))
    seq = lay.super_resolution([9], low, high)
    t, p = seq.tokens, seq.position_ids
    roi2 = (t == lay["[ROI2]"]).nonzero().item()
    assert p[roi2] == 0 and p[roi2 - 1] == roi2 - 1
    assert t[roi2 + 1] == lay["[POS0]"] and t[roi2 + 3] == lay["[BOI2]"]
    assert seq.image_start == roi2 + 4 and torch.equal(t[roi2 + 4:roi2 + 260], high)
    assert t.numel() == lay.seq_length("super_resolution")
    assert int(p.max()) < lay.max_positions("super_resolution")
    with pytest.raises(ValueError, match="expected 64 image codes"):
        lay.super_resolution([9], high, high)


def test_over_long_text_is_truncated_and_counted(caplog):
    lay = TokenLayout(max_text_tokens=4)
    codes = torch.zeros(lay.image_tokens, dtype=torch.long)
    with caplog.at_level("WARNING"):
        seq = lay.text_to_image(list(range(10)), codes)
    assert lay.decode_text_ids(seq.tokens) == [0, 1, 2, 3]
    assert lay.stats["truncated_text"] == 1 and "truncated" in caplog.text


def test_out_of_range_ids_are_errors():
    lay = TokenLayout(num_image_codes=16, num_text_tokens=10)
    with pytest.raises(ValueError, match="text id out of range"):
        lay.text_tokens([10])
    with pytest.raises(ValueError, match="image code out of range"):
        lay.image_codes([16])
    with pytest.raises(KeyError, match="unknown special token"):
        lay["[NOPE]"]
    with pytest.raises(ValueError, match="image_grid"):
        TokenLayout(image_grid=65)
    # a grid between two standard sides takes the size token of the next larger one
    assert TokenLayout(image_grid=12).size_token == TokenLayout(image_grid=16).size_token
    assert TokenLayout(image_grid=9).size_token != TokenLayout(image_grid=8).size_token


def test_json_round_trip_and_mismatch(tmp_path):
    lay = TokenLayout(num_image_codes=512, num_text_tokens=900, image_grid=16, max_text_tokens=20)
    path = tmp_path / "layout.json"
    lay.save(str(path))
    again = TokenLayout.load(str(path))
    assert again == lay
    again.check_compatible(lay, "checkpoint")
    other = TokenLayout(num_image_codes=1024, num_text_tokens=900, image_grid=16, max_text_tokens=20)
    with pytest.raises(LayoutMismatchError, match="data.lmdb: token layout mismatch in num_image_codes"):
        lay.check_compatible(other, "data.lmdb")
    bad = json.loads(path.read_text())
    bad["format"] = "something/else"
    path.write_text(json.dumps(bad))
    with pytest.raises(LayoutMismatchError, match="not a token layout"):
        TokenLayout.load(str(path))


def test_fixed_image_positions_do_not_depend_on_the_caption_length(tmp_path):
    """image_positions="fixed": every code of the grid has one position id whatever the caption's
    length (t2i, completion, super-resolution prefix); "after_text" numbers on from the text."""
    fixed, cogview_like = (TokenLayout(image_grid=8, max_text_tokens=10, image_positions=p)
                           for p in ("fixed", "after_text"))
    codes = list(range(64))
    for lay in (fixed, cogview_like):
        for text in ([5], [5, 6, 7, 8]):
            seq = lay.text_to_image(text, codes)
            n_text = len(text)
            assert seq.position_ids[:1 + n_text].tolist() == list(range(1 + n_text))
            image_pos = seq.position_ids[seq.image_start:seq.image_start + 64]
            assert (image_pos.diff() == 1).all()
            want = 13 if lay is fixed else 3 + n_text  # 1 + max_text_tokens + 2
            assert image_pos[0].item() == want
            assert seq.position_ids.max().item() < lay.max_positions("text_to_image")
            # the prompt and a completion prompt are prefixes of the training sequence
            prompt = lay.text_to_image(text)
            assert prompt.position_ids.tolist() == seq.position_ids[:seq.image_start].tolist()
            comp = lay.completion(text, codes[:5])
            assert comp.position_ids.tolist() == seq.position_ids[:seq.image_start + 5].tolist()
            sr = lay.super_resolution(text, codes[:16], codes)
            low = sr.position_ids[3 + n_text:3 + n_text + 16]
            assert low[0].item() == want
            # the caption direction (image first): its codes have the same ids with fixed positions
            i2t = lay.image_to_text(codes, text)
            assert i2t.position_ids[2].item() == (want if lay is fixed else 2)
            assert (i2t.position_ids.diff() >= 0).all()
            assert i2t.position_ids.max().item() < lay.max_positions("image_to_text")
            assert lay.image_to_text(codes).position_ids.tolist() == i2t.position_ids[:68].tolist()
    # files written before the field existed were numbered on from the text
    path = tmp_path / "layout.json"
    fixed.save(str(path))
    old = json.loads(path.read_text())
    del old["image_positions"]
    path.write_text(json.dumps(old))
    assert TokenLayout.load(str(path)).image_positions == "after_text"
    assert TokenLayout.cogview().image_positions == "after_text"
    with pytest.raises(ValueError, match="image_positions must be one of after_text, fixed"):
        TokenLayout(image_positions="relative")
