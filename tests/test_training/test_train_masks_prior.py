"""Masked loss (`<image>.mask.png`, `masks`, `mask_background_weight`) and the prior modes
(`prior = images | model | none`): known values, files read and cut like their images, and runs
that use them and resume exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from personalize.data import list_image_files, load_mask, mask_file
from personalize.errors import UserError
from personalize.inject import attach
from personalize.models import tiny_unet
from personalize.train import TrainCallback, TrainConfig, train
from personalize.training.callbacks import CLASS_IMAGES_STAGE
from personalize.training.conditioning import Conditioning
from personalize.training.config import load_config
from personalize.training.objective import Batch, per_sample_mse
from personalize.training.prior import class_images_needed, default_class_dir
from personalize.training.trainer import Trainer
from tests.test_training.conftest import make_photos
from tests.test_training.test_train_resume import assert_same_run, resumed_run, step_losses


def test_masked_error_known_values():
    prediction = torch.zeros(2, 2, 2, 2)  # (b, c, h, w)
    target = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2).expand(2, 2, 2, 2)  # squared errors 1, 4, 9, 16 per channel
    masks = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)  # top row is the subject
    batch = Batch(prediction[:1], Conditioning(torch.zeros(1, 3, 8)), masks, prediction[1:], Conditioning(torch.zeros(1, 3, 8)))
    [(latents, _, weights)] = batch.parts(background_weight=0.25)  # one UNet call: instance row masked, class row not
    assert latents.shape == (2, 2, 2, 2)
    assert weights[0, 0].tolist() == [[1.0, 1.0], [0.25, 0.25]] and weights[1].eq(1).all()
    errors = per_sample_mse(prediction, target, weights)
    assert errors[0].item() == pytest.approx((1 + 4 + 0.25 * 9 + 0.25 * 16) / 2.5)
    assert errors[1].item() == pytest.approx((1 + 4 + 9 + 16) / 4)  # unmasked: the plain mean
    full = Batch(prediction, None, masks=torch.ones(2, 1, 2, 2)).parts(0.0)[0][2]
    assert per_sample_mse(prediction, target, full).allclose(per_sample_mse(prediction, target))
    # class rows of another size (aspect buckets) run as a second UNet call, weights 1
    other = Batch(prediction[:1], None, masks, torch.zeros(3, 2, 4, 2), None).parts(0.25)
    assert [p[0].shape[0] for p in other] == [1, 3] and other[1][2].shape == (3, 1, 4, 2) and other[1][2].eq(1).all()


def test_mask_files_are_read_resized_and_not_images(tmp_path):
    photo = make_photos(tmp_path, count=1, size=(96, 80))[0]
    rgba = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 24, 40))  # painted left half, transparent right half
    rgba.save(mask_file(photo))
    assert mask_file(photo).name == "photo_0.mask.png"
    assert list_image_files(tmp_path) == [photo]  # the mask is not an instance image of its own
    mask = load_mask(mask_file(photo), (96, 80))
    assert mask.mode == "L" and mask.size == (96, 80)
    assert mask.getpixel((5, 40)) == 255 and mask.getpixel((90, 40)) == 0
    mask_file(photo).write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"mask '.*photo_0\.mask\.png' cannot be read"):
        load_mask(mask_file(photo), (96, 80))
    with pytest.raises(UserError, match=r"mask '.*photo_0\.mask\.png' cannot be read"):
        Trainer(TrainConfig(instance_images=str(tmp_path), output_dir=str(tmp_path / "run"), base_model="no-such-model"), [], None)


def masked_photos(folder, count: int = 3):
    """Photos whose left half is marked as the subject."""
    paths = make_photos(folder, count=count)
    for path in paths:
        mask = Image.new("L", Image.open(path).size, 0)
        mask.paste(255, (0, 0, mask.width // 2, mask.height))
        mask.save(mask_file(path))
    return paths


def test_masks_are_cut_like_their_images_and_follow_flips(tmp_path, fast):
    masked_photos(tmp_path / "photos")
    config = TrainConfig(**{**fast, "instance_images": str(tmp_path / "photos"), "random_flip": True, "resolution": 32})
    trainer = Trainer(config, [], None)
    trainer.prepare()
    mask = trainer.instance.mask  # (2n, 1, h, w): originals, then mirrored copies
    assert mask.shape[0] == 6 and mask.shape[1] == 1
    half = mask.shape[-1] // 2
    assert mask[:3, :, :, : half - 1].eq(1).all() and mask[:3, :, :, half + 1 :].eq(0).all()
    assert torch.allclose(mask[3:], torch.flip(mask[:3], dims=[3]), atol=1e-6)


def test_masked_runs_use_the_masks_and_resume_exactly(tmp_path, fast):
    masked_photos(tmp_path / "photos")
    settings = {**fast, "instance_images": str(tmp_path / "photos"), "mask_background_weight": 0.0, "checkpoint_every": 2}
    masked = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "masked")}))
    plain = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "plain"), "masks": "off"}))
    assert step_losses(tmp_path / "masked") != step_losses(tmp_path / "plain")

    assert_same_run(resumed_run(settings, tmp_path / "part"), masked)
    assert plain.steps_done == masked.steps_done == 4


def test_switched_off_adapter_is_the_base_model():
    unet = tiny_unet("sd1")
    latents, timesteps = torch.randn(1, 4, 16, 16), torch.tensor([500])
    text = torch.randn(1, 8, unet.config.cross_attention_dim)
    base = unet(latents, timesteps, encoder_hidden_states=text).sample
    adapter = attach(unet, "lora")
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(0.1)  # a non-zero update
    adapted = unet(latents, timesteps, encoder_hidden_states=text).sample
    with adapter.switched_off():
        off = unet(latents, timesteps, encoder_hidden_states=text).sample
    assert torch.equal(off, base) and not torch.allclose(adapted, base)
    assert torch.equal(unet(latents, timesteps, encoder_hidden_states=text).sample, adapted)  # switched back on


def test_prior_model_needs_no_class_images_and_resumes_exactly(tmp_path, fast):
    settings = {**fast, "prior": "model", "class_data_dir": str(tmp_path / "classes"), "checkpoint_every": 2}
    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}))
    assert not (tmp_path / "classes").exists()  # nothing generated
    assert_same_run(resumed_run(settings, tmp_path / "part"), full)


class StageReports(TrainCallback):
    """The (done, total) reports of one preparation stage."""

    def __init__(self, stage: str = CLASS_IMAGES_STAGE) -> None:
        self.stage, self.reports = stage, []

    def on_prepare(self, stage: str, done: int, total: int) -> None:
        if stage == self.stage:
            self.reports.append((done, total))


@pytest.mark.parametrize(
    "wanted, steps, batch, accumulation, processes, expected",
    [
        (100, 30, 1, 1, 1, 30),  # the default class_images on a 30-step run: 30 are drawn
        (100, 30, 2, 2, 1, 100),  # 120 drawn: all 100
        (100, 10, 2, 2, 2, 80),  # each process draws its own
        (10, 30, 1, 1, 1, 10),
    ],
)
def test_class_images_needed(wanted, steps, batch, accumulation, processes, expected):
    assert class_images_needed(wanted, steps, batch, accumulation, processes) == expected


def test_prior_images_makes_no_more_class_images_than_the_run_draws(tmp_path, fast):
    """class_images 5, but 2 steps of batch 1 draw 2: two are made, one per pipeline call, each call reported;
    a 3-step run keeps those and makes the third; a 1-step run makes none and encodes one."""
    folder = tmp_path / "classes"
    settings = {**fast, "prior": "images", "class_data_dir": str(folder), "class_images": 5, "class_batch_size": 1}
    seen = StageReports()
    train(TrainConfig(**{**settings, "steps": 2, "output_dir": str(tmp_path / "a")}), [seen])
    first = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert sorted(first) == ["class_00000.png", "class_00001.png"]
    assert seen.reports == [(0, 2), (1, 2), (2, 2)]

    seen = StageReports()
    train(TrainConfig(**{**settings, "steps": 3, "output_dir": str(tmp_path / "b")}), [seen])
    assert seen.reports == [(0, 1), (1, 1)]
    files = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert len(files) == 3 and all(files[name] == mtime for name, mtime in first.items())  # reused, not rewritten

    seen = StageReports()
    trainer = Trainer(TrainConfig(**{**settings, "steps": 1, "output_dir": str(tmp_path / "c")}), [seen], None)
    trainer.prepare()
    assert seen.reports == [] and len(trainer.classes) == 1 and len(list(folder.glob("*.png"))) == 3


def test_class_image_cache_key_holds_what_the_pixels_depend_on(tmp_path, monkeypatch):
    dog = default_class_dir("tiny", "a photo of dog", 64, 3)
    assert default_class_dir("tiny", "a photo of dog", 64, 3) == dog
    others = [
        default_class_dir("tiny", "a photo of cat", 64, 3),
        default_class_dir("shapes", "a photo of dog", 64, 3),
        default_class_dir("tiny", "a photo of dog", 32, 3),
        default_class_dir("tiny", "a photo of dog", 64, 25),
    ]
    assert len({dog, *others}) == 5
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    by_path = default_class_dir(str(checkpoint), "a photo of dog", 64, 3)
    assert default_class_dir("model.safetensors", "a photo of dog", 64, 3) == by_path  # relative or absolute: one model
    checkpoint.write_bytes(b"new weights")  # replaced by another checkpoint under the same name
    assert default_class_dir(str(checkpoint), "a photo of dog", 64, 3) != by_path


def test_class_images_are_reused_for_the_same_class_noun_only(tmp_path, fast, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    settings = {**fast, "prior": "images", "class_data_dir": None, "steps": 1}

    def generated(noun: str, name: str) -> list:
        seen = StageReports()
        train(TrainConfig(**{**settings, "class_noun": noun, "output_dir": str(tmp_path / name)}), [seen])
        return seen.reports

    assert generated("dog", "a") == [(0, 1), (1, 1)]
    assert generated("cat", "b") == [(0, 1), (1, 1)]  # another class prompt: its own images
    assert generated("dog", "c") == []  # the same one: reused
    folders = sorted(p.name for p in (tmp_path / "cache" / "class_images").iterdir())
    assert len(folders) == 2 and folders[0].startswith("a-photo-of-cat-32px") and folders[1].startswith("a-photo-of-dog-32px")


def test_old_prior_preservation_setting_still_reads():
    assert load_config(None, instance_images="p", output_dir="o", prior_preservation=False).prior == "none"
    assert load_config(None, instance_images="p", output_dir="o", prior_preservation=True).prior == "images"


def test_prior_rows_target_the_frozen_model(fast, monkeypatch):
    """Prior 'model' at LoRA's init (update zero): the adapted model is the frozen one, so the prior rows'
    errors are 0 while the instance rows' are not; the prior rows use the class prompt."""
    import personalize.training.trainer as trainer_module

    trainer = Trainer(TrainConfig(**{**fast, "prior": "model", "batch_size": 2}), [], None)
    trainer.prepare()
    seen = {}

    def capture(errors, weights, instances, prior_loss_weight):
        seen.update(errors=errors.detach(), instances=instances)
        return errors.mean()

    monkeypatch.setattr(trainer_module, "dreambooth_loss", capture)
    trainer.loss(trainer.micro_batch(0, 0))
    errors, n = seen["errors"], seen["instances"]
    assert n == 2 and len(errors) == 4
    assert errors[:n].gt(0.1).all() and errors[n:].lt(1e-10).all()  # 0 up to the rounding of a 2n-row vs n-row UNet call


def test_keep_unconditional_rows_target_the_frozen_empty_prompt_prediction(fast, monkeypatch):
    """keep_unconditional = w with prior 'model': the loss is DreamBooth's over instance and class rows plus w times
    the mean error of the empty-prompt rows, appended last; at LoRA's init those rows' errors are 0, after a
    non-zero update they are not, and their conditioning is the empty prompt's."""
    import personalize.training.trainer as trainer_module

    trainer = Trainer(TrainConfig(**{**fast, "prior": "model", "batch_size": 2, "keep_unconditional": 0.5}), [], None)
    trainer.prepare()
    seen, real_loss = {}, trainer_module.dreambooth_loss

    def capture(errors, weights, instances, prior_loss_weight):
        seen.update(errors=errors.detach(), instances=instances, loss=real_loss(errors, weights, instances, prior_loss_weight))
        return seen["loss"]

    monkeypatch.setattr(trainer_module, "dreambooth_loss", capture)
    calls = []
    model_call = trainer.model.forward

    def record(sample, timestep, encoder_hidden_states=None, **kw):
        calls.append(encoder_hidden_states.detach())
        return model_call(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kw)

    monkeypatch.setattr(trainer.model, "forward", record)
    batch = trainer.micro_batch(0, 0)
    assert float(trainer.loss(batch).detach()) == float(seen["loss"])  # at init the null rows add 0
    errors, n = seen["errors"], seen["instances"]
    assert len(errors) == 2 * n  # instance and class rows go to DreamBooth's loss; the null rows do not
    trained = calls[-1]  # the adapted call: instance, class and empty-prompt rows
    assert len(trained) == 3 * n and torch.equal(trained[2 * n :], trainer.null_cond.take(torch.zeros(n, dtype=torch.long)).embeds)
    with torch.no_grad():
        for param in trainer.adapter.parameters():
            param.add_(0.05)  # a non-zero update: the empty prompt's prediction moves away from the frozen one
    total = float(trainer.loss(batch).detach())
    assert total > float(seen["loss"]) + 1e-6  # the null rows' error, weighted by 0.5, is added


def test_auto_masks_fill_the_photos_without_a_file(tmp_path):
    from personalize.data import load_image
    from personalize.training.masks import auto_masks_for, mask_files

    paths = [str(p) for p in make_photos(tmp_path, count=3)]
    drawn = Image.new("L", Image.open(paths[0]).size, 0)
    drawn.save(mask_file(paths[0]))  # all background: tells the file's mask from a segmentation
    files = mask_files(paths, "files")
    assert set(files) == {paths[0]} and mask_files(paths, "off") == {}
    masks = auto_masks_for(paths, files, "circle", "tiny", torch.device("cpu"))
    assert set(masks) == set(paths) and masks[paths[0]].getbbox() is None
    assert all(masks[p].size == load_image(p).size and masks[p].mode == "L" for p in paths)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_black_and_white_mask_with_opaque_alpha_reads_its_grey_levels(tmp_path, mode):
    """Editors save masks as RGBA with every pixel opaque: the alpha says nothing, the grey levels tell the subject."""
    photo = make_photos(tmp_path, count=1, size=(96, 80))[0]
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (0, 0, 48, 80))  # white left half = subject
    mask.convert(mode).save(mask_file(photo))
    assert Image.open(mask_file(photo)).mode == mode and Image.open(mask_file(photo)).getchannel("A").getextrema() == (255, 255)
    read = load_mask(mask_file(photo), (96, 80))
    assert read.getpixel((5, 40)) == 255 and read.getpixel((90, 40)) == 0


def black_masks(folder, count: int, empty: int) -> list:
    """`count` photos with masks, the first `empty` of them all black (no subject), the others a white left half."""
    paths = masked_photos(folder, count)
    for path in paths[:empty]:
        Image.new("L", Image.open(path).size, 0).save(mask_file(path))
    return paths


def test_all_empty_masks_with_background_weight_0_are_refused(tmp_path, fast):
    black_masks(tmp_path / "photos", 3, empty=3)
    settings = {**fast, "instance_images": str(tmp_path / "photos"), "mask_background_weight": 0.0}
    with pytest.raises(UserError, match=r"every mask is empty .*nothing would train: .*photo_0\.mask\.png, .*photo_2\.mask\.png") as info:
        Trainer(TrainConfig(**settings), [], None)  # before any model loads or anything is written
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("weight, empty, effect", [(0.1, 3, "train only as background, at weight 0.1"), (0.0, 1, "teach nothing")])
def test_empty_masks_are_named_and_counted(tmp_path, fast, caplog, weight, empty, effect):
    black_masks(tmp_path / "photos", 3, empty=empty)
    settings = {**fast, "instance_images": str(tmp_path / "photos"), "mask_background_weight": weight}
    with caplog.at_level(logging.INFO, logger="personalize.training.masks"):
        Trainer(TrainConfig(**settings), [], None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{empty} mask(s) are empty" in warnings[0] and effect in warnings[0]
    assert "photo_0.mask.png" in warnings[0] and ("photo_2.mask.png" in warnings[0]) == (empty == 3)
    assert f"masked loss on {3 - empty} of 3 photo(s); {empty} with an empty mask" in caplog.text
