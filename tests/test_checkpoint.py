import hashlib
import os

from megatron_t2i.training.checkpoint import store_tokenizers


def meta_for(text_path, image_path, text_sha=None, image_sha=None):
    def sha(p):
        return hashlib.sha256(open(p, "rb").read()).hexdigest()
    return {"text_tokenizer_sha256": text_sha or sha(text_path),
            "image_tokenizer_sha256": image_sha or sha(image_path),
            "report": {"text_tokenizer_path": text_path, "image_tokenizer_path": image_path}}


def test_tokenizers_are_copied_beside_checkpoints_once(tmp_path):
    text, image = tmp_path / "t.model", tmp_path / "v.pt"
    text.write_bytes(b"sentencepiece")
    image.write_bytes(b"vqvae")
    save = str(tmp_path / "ck")
    stored = store_tokenizers(save, meta_for(str(text), str(image)))
    assert open(stored["text"], "rb").read() == b"sentencepiece"
    assert open(stored["image"], "rb").read() == b"vqvae"
    text.write_bytes(b"changed later")  # a second run keeps the copy the data set was made with
    store_tokenizers(save, meta_for(str(text), str(image)))
    assert open(stored["text"], "rb").read() == b"sentencepiece"


def test_a_tokenizer_changed_since_preprocessing_is_not_copied(tmp_path):
    text, image = tmp_path / "t.model", tmp_path / "v.pt"
    text.write_bytes(b"a")
    image.write_bytes(b"b")
    stored = store_tokenizers(str(tmp_path / "ck"), meta_for(str(text), str(image), text_sha="0" * 64))
    assert "text" not in stored and "image" in stored
    assert not os.path.exists(tmp_path / "ck" / "tokenizers" / "text.model")


def test_a_folder_without_our_jsons_is_named_clearly(tmp_path):
    import pytest

    from megatron_t2i.training.checkpoint import CheckpointError, read_checkpoint_info
    (tmp_path / "latest").write_text("iter_0000001")
    os.mkdir(tmp_path / "iter_0000001")
    with pytest.raises(CheckpointError, match="missing model_config.json; not a megatron_t2i"):
        read_checkpoint_info(str(tmp_path))
