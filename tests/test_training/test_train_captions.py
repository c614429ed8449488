"""Per-image captions (`<image>.txt`, kohya's convention): read, checked, used as each photo's prompt."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import personalize.training.trainer as trainer_module
from personalize.data import list_image_files, read_captions
from personalize.errors import UserError
from personalize.train import TrainConfig, train
from personalize.training.captions import instance_prompts
from tests.test_training.conftest import make_photos


@pytest.fixture
def captioned(tmp_path):
    files = make_photos(tmp_path / "photos")
    files[0].with_suffix(".txt").write_text("a {token} {class_noun}\n  asleep on a red sofa\n", encoding="utf-8")
    files[1].with_suffix(".txt").write_text("sks dog on the beach", encoding="utf-8")  # the literal token
    files[2].with_suffix(".txt").write_text("   \n", encoding="utf-8")  # empty: the template
    return files


def test_captions_are_read_next_to_the_images(captioned, caplog):
    with caplog.at_level(logging.INFO, logger="personalize.data"):
        files = list_image_files(captioned[0].parent)
    assert files == captioned and "skipping" not in caplog.text  # caption files are not reported as stray files
    captions = read_captions([str(f) for f in files])
    assert captions == {str(captioned[0]): "a {token} {class_noun} asleep on a red sofa", str(captioned[1]): "sks dog on the beach"}


def test_each_photo_gets_its_caption_or_the_template(captioned):
    config = TrainConfig(instance_images="x", output_dir="out", token="sks", class_noun="dog")
    files = [str(f) for f in captioned]
    assert instance_prompts(config, files) == ["a sks dog asleep on a red sofa", "sks dog on the beach", "a photo of sks dog"]
    off = TrainConfig(instance_images="x", output_dir="out", token="sks", class_noun="dog", captions=False)
    assert instance_prompts(off, files) == ["a photo of sks dog"] * 3


def test_bad_captions_name_the_file(captioned, caplog):
    config = TrainConfig(instance_images="x", output_dir="out", token="sks", class_noun="dog")
    files = [str(f) for f in captioned]
    captioned[2].with_suffix(".txt").write_text("a dog on grass", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        instance_prompts(config, files)
    assert "photo_2.txt" in caplog.text and "names neither {token} nor 'sks'" in caplog.text
    captioned[2].with_suffix(".txt").write_text("a {subject} on grass", encoding="utf-8")
    with pytest.raises(UserError, match=r"caption in '.*photo_2\.txt' .*unknown placeholder \{subject\}"):
        instance_prompts(config, files)
    captioned[2].with_suffix(".txt").write_bytes(b"a \xff\xfe dog")
    with pytest.raises(UserError, match=r"caption file '.*photo_2\.txt' is not UTF-8"):
        instance_prompts(config, files)


def test_training_conditions_each_photo_on_its_caption(captioned, fast, monkeypatch, tmp_path):
    encoded: list[list[str]] = []
    original = trainer_module.encode_prompts
    monkeypatch.setattr(trainer_module, "encode_prompts", lambda pipe, prompts, *a: encoded.append(prompts) or original(pipe, prompts, *a))
    used: list[torch.Tensor] = []
    take = trainer_module.Trainer.instance_conditioning
    monkeypatch.setattr(
        trainer_module.Trainer, "instance_conditioning", lambda self, index: used.append(index.clone()) or take(self, index)
    )
    settings = {**fast, "instance_images": str(captioned[0].parent), "method": "lora", "steps": 3, "token": "sks", "class_noun": "dog"}
    result = train(TrainConfig(**settings))
    assert encoded[0] == ["a sks dog asleep on a red sofa", "sks dog on the beach", "a photo of sks dog"]
    assert used and all(int(i.max()) < 3 for i in used)
    # the same photos without captions: another run (a resume must not mix them)
    plain = tmp_path / "plain"
    shutil.copytree(captioned[0].parent, plain)
    for caption in plain.glob("*.txt"):
        caption.unlink()
    other = train(TrainConfig(**{**settings, "instance_images": str(plain), "output_dir": str(tmp_path / "run2")}))
    assert other.eval_loss_end != result.eval_loss_end


def test_captioned_run_resumes_exactly(captioned, fast, tmp_path):
    from tests.test_training.test_train_resume import assert_same_run, resumed_run

    settings = {**fast, "instance_images": str(captioned[0].parent), "token": "sks", "class_noun": "dog", "checkpoint_every": 2}
    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}))
    assert_same_run(resumed_run(settings, tmp_path / "part"), full)


def test_oversized_caption_is_refused(captioned, fast):
    """A caption file far beyond what the text encoder reads (a log pasted by mistake) is refused, naming the file,
    before any model loads, instead of being copied into the adapter's metadata and the tokenizer's warning."""
    from personalize.data import MAX_CAPTION_BYTES
    from personalize.training.trainer import Trainer

    near = "sks dog " * (MAX_CAPTION_BYTES // 8)  # exactly at the limit: accepted
    captioned[1].with_suffix(".txt").write_text(near, encoding="utf-8")
    assert len(near.encode()) == MAX_CAPTION_BYTES and read_captions([str(captioned[1])]) == {str(captioned[1]): near.strip()}
    captioned[1].with_suffix(".txt").write_text("sks dog " * 1_250_000, encoding="utf-8")  # 10 MB
    settings = {**fast, "instance_images": str(captioned[0].parent), "token": "sks"}
    message = rf"caption file '.*photo_1\.txt' is 10,000,000 bytes; at most {MAX_CAPTION_BYTES:,} are accepted"
    with pytest.raises(UserError, match=message) as info:
        Trainer(TrainConfig(**settings), [], None)
    assert "\n" not in str(info.value)
