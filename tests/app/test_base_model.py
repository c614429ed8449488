"""The app's base model: offline fallback with a banner, and the size estimate that leaves the UNet untouched."""

from __future__ import annotations

import torch

from app.base_model import BaseModel
from personalize import METHODS, attach
from personalize.adapters.slots import ADAPTER_ATTR
from personalize.models import tiny_unet


def test_unreachable_model_falls_back_to_shapes_with_a_banner(tmp_path):
    missing = str(tmp_path / "no-such-model")
    base = BaseModel(missing).load()
    assert base.name == "shapes" and base.embedders == "shapes"
    assert missing in base.banner and "'shapes'" in base.banner and "coloured shapes" in base.banner
    tiny = BaseModel("tiny").load()
    assert tiny.banner == "" and tiny.embedders == "tiny"
    assert BaseModel(missing).embedders == "default"  # a user's model: the real backbones


def test_estimate_counts_sizes_and_detaches():
    base = BaseModel("tiny").load()
    before = {k: v.clone() for k, v in base.pipe.unet.state_dict().items()}
    for method in METHODS:
        count, size = base.estimate(method, {})
        assert count == attach(tiny_unet("sd1"), method).num_trainable > 0
        assert size > count  # float tensors: at least one byte per parameter, plus the header
    count, _ = base.estimate("lora", {"rank": 8})
    assert count == 2 * base.estimate("lora", {})[0]
    after = base.pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, ADAPTER_ATTR) or hasattr(m, "base_layer") for m in base.pipe.unet.modules())
