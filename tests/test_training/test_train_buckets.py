"""Aspect-ratio buckets (`buckets = true`): bucket sizes, assignment, one bucket per batch, and runs
that train, evaluate and resume with photos (and class images) of several shapes."""

from __future__ import annotations

import math

import torch
from PIL import Image

from personalize.train import TrainConfig, train
from personalize.training.buckets import BucketedLatents, bucket_sizes, nearest_bucket
from personalize.training.latents import LatentSet
from personalize.training.trainer import Trainer
from tests.test_training.conftest import make_photos
from tests.test_training.test_train_resume import assert_same_run, resumed_run


def test_bucket_sizes_for_stable_diffusion():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 512 * 512
        assert 256 <= min(width, height) and max(width, height) <= 1024
    assert nearest_bucket(3000, 2000, sizes) == (640, 384)  # 3:2 landscape
    assert nearest_bucket(2000, 3000, sizes) == (384, 640)
    assert nearest_bucket(999, 1000, sizes) == (512, 512)


def test_batches_hold_one_bucket_and_cover_each_epoch():
    def latents(n):
        return LatentSet(torch.zeros(n, 4, 2, 2), torch.ones(n, 4, 2, 2), 1.0, 0.0, size=(16, 16))

    bucketed = BucketedLatents([latents(3), latents(2)], [torch.tensor([0, 2, 4]), torch.tensor([1, 3])])
    per_epoch = math.ceil(3 / 2) + math.ceil(2 / 2)  # batches of at most 2 rows: 2 + 1
    for epoch in range(3):
        batches = [bucketed.batch(epoch * per_epoch + k, 2, seed=7) for k in range(per_epoch)]
        assert sorted(torch.cat(batches).tolist()) == [0, 1, 2, 3, 4]  # every row once per epoch
        for rows in batches:
            assert set(rows.tolist()) <= {0, 2, 4} or set(rows.tolist()) <= {1, 3}
    assert torch.equal(bucketed.batch(5, 2, seed=7), bucketed.batch(5, 2, seed=7))  # by position only: resumable


def mixed_photos(folder):
    """Two landscape photos and one tall one."""
    paths = make_photos(folder, count=2, size=(128, 72))
    tall = Image.open(paths[0]).resize((64, 128))
    tall.save(folder / "tall.png")
    return folder


def test_bucketed_run_encodes_each_shape_and_resumes_exactly(tmp_path, fast):
    photos = mixed_photos(tmp_path / "photos")
    settings = {**fast, "instance_images": str(photos), "buckets": True, "random_flip": True, "checkpoint_every": 2, "batch_size": 2}
    trainer = Trainer(TrainConfig(**{**settings, "output_dir": str(tmp_path / "probe")}), [], None)
    trainer.prepare()
    shapes = sorted(tuple(s.mean.shape[-2:]) for s in trainer.instance.sets)
    assert len(shapes) == 2 and {height < width for height, width in shapes} == {True, False}  # a wide and a tall latent grid
    assert len(trainer.eval_sets) == 2 and sum(len(s) for s in trainer.eval_sets) == 3 * fast["eval_timesteps"]
    time_ids = trainer.instance.time_ids(torch.tensor([2]))  # the tall photo: target size = its bucket's (height, width)
    assert time_ids[0, 4] > time_ids[0, 5]

    full = train(TrainConfig(**{**settings, "output_dir": str(tmp_path / "full")}))
    assert_same_run(resumed_run(settings, tmp_path / "part"), full)


def test_bucketed_class_images_of_another_shape(tmp_path, fast):
    """Square class images next to a wide instance batch: two UNet calls, the prior loss still counts."""
    photos = tmp_path / "photos"
    make_photos(photos, count=2, size=(128, 64))
    classes = tmp_path / "classes"
    make_photos(classes, count=2, size=(64, 64))
    settings = {**fast, "instance_images": str(photos), "buckets": True, "prior": "images", "class_data_dir": str(classes)}
    trainer = Trainer(TrainConfig(**{**settings, "output_dir": str(tmp_path / "a")}), [], None)
    trainer.prepare()
    parts = trainer.micro_batch(0, 0).parts(trainer.config.mask_background_weight)
    assert len(parts) == 2 and parts[0][0].shape[-2:] != parts[1][0].shape[-2:]  # one UNet call per shape
    loss = trainer.loss(trainer.micro_batch(0, 0))
    assert math.isfinite(loss.item())
    loss.backward()  # the adapter gets gradients through both calls
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.adapter.parameters())
