"""The concept library on disk: persistence across restarts, rename, delete, recovery, name checks."""

from __future__ import annotations

import functools
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.locations import default_workspace
from app.workspace import DONE, INTERRUPTED, STOPPED, TRAINING, Concept, Workspace
from personalize.errors import UserError


def make_images(folder, count=3):
    paths = []
    for index in range(count):
        path = folder / f"photo {index}.png"
        Image.new("RGB", (64, 64), (index * 60, 100, 200)).save(path)
        paths.append(str(path))
    return paths


def new_concept(name="My Dog", **fields):
    values = dict(id="", name=name, method="lora", base_model="tiny", token="sks", class_noun="dog", steps=5, lr=1e-4)
    values.update(fields)
    return Concept(**values)


def test_create_copies_images_and_survives_restart(tmp_path):
    space = Workspace(tmp_path / "ws")
    concept = space.create(new_concept(), make_images(tmp_path))
    assert concept.id == "my-dog" and concept.created
    assert sorted(p.name for p in space.images_dir(concept.id).iterdir()) == concept.images
    assert len(concept.images) == 3
    stored = json.loads((space.folder(concept.id) / "concept.json").read_text())
    assert stored["name"] == "My Dog" and stored["status"] == TRAINING

    reopened = Workspace(tmp_path / "ws")  # a restarted app sees the same library
    assert [c.name for c in reopened.concepts()] == ["My Dog"]
    assert reopened.get(concept.id) == concept


def test_names_are_unique_and_checked(tmp_path):
    space = Workspace(tmp_path)
    first = space.create(new_concept("cat"), make_images(tmp_path, 1))
    with pytest.raises(UserError, match="already exists"):
        space.create(new_concept("CAT"), make_images(tmp_path, 1))
    with pytest.raises(UserError, match="empty"):
        space.create(new_concept("   "), make_images(tmp_path, 1))
    second = space.create(new_concept("cat!"), make_images(tmp_path, 1))  # same slug, distinct folder
    assert first.id == "cat" and second.id.startswith("cat-") and second.id != first.id
    with pytest.raises(UserError, match="already exists"):
        space.rename(second.id, "Cat")


def test_rename_keeps_folder_and_delete_removes_everything(tmp_path):
    space = Workspace(tmp_path)
    concept = space.create(new_concept(), make_images(tmp_path))
    renamed = space.rename(concept.id, "  Rex   the dog ")
    assert renamed.name == "Rex the dog" and renamed.id == concept.id
    assert space.get(concept.id).name == "Rex the dog"
    space.delete(concept.id)
    assert space.concepts() == []
    assert not space.folder(concept.id).exists()
    assert list(space.concepts_dir.iterdir()) == []
    with pytest.raises(UserError, match="no concept"):
        space.get(concept.id)


def test_recover_marks_interrupted_runs_and_finishes_deletions(tmp_path):
    space = Workspace(tmp_path)
    stale = space.create(new_concept("a"), make_images(tmp_path, 1))
    saved = space.create(new_concept("b"), make_images(tmp_path, 1))
    space.adapter_path(saved.id).parent.mkdir(parents=True)
    space.adapter_path(saved.id).write_bytes(b"adapter")
    finished = space.create(new_concept("c", status=DONE), make_images(tmp_path, 1))
    (space.concepts_dir / ".deleted-x-123456").mkdir()
    marked = space.recover()
    assert sorted(c.id for c in marked) == sorted([stale.id, saved.id])
    assert space.get(stale.id).status == INTERRUPTED
    assert space.get(saved.id).status == STOPPED
    assert space.get(finished.id).status == DONE
    assert not (space.concepts_dir / ".deleted-x-123456").exists()


def test_generation_runs_newest_first_and_only_with_manifest(tmp_path):
    space = Workspace(tmp_path)
    concept = space.create(new_concept(), make_images(tmp_path, 1))
    first = space.new_generation_dir(concept.id)
    first.mkdir(parents=True)
    (first / "manifest.jsonl").write_text("{}\n")
    second = space.new_generation_dir(concept.id)
    assert second != first
    second.mkdir()
    (second / "manifest.jsonl").write_text("{}\n")
    space.new_generation_dir(concept.id).mkdir()  # no manifest: not a run
    assert space.generation_runs(concept.id) == [second.name, first.name]
    assert space.generated_dir(None) == space.root / "generated"


def test_bad_ids_and_default_location(tmp_path, monkeypatch):
    space = Workspace(tmp_path)
    with pytest.raises(UserError, match="not a concept id"):
        space.folder("../outside")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_workspace() == tmp_path / "data" / "personalize"


def test_concept_record_comes_from_the_effective_config(tmp_path):
    from personalize import get_method
    from personalize.train import effective_config

    space = Workspace(tmp_path / "ws")
    concept_id = space.new_id("My Cat")
    config = effective_config(
        instance_images=str(space.images_dir(concept_id)),
        output_dir=str(space.train_dir(concept_id)),
        base_model="tiny",
        method="svfit",
        class_noun="cat",
        method_options={"rank": "4"},
    )
    concept = space.create(Concept.from_config(concept_id, "My Cat", config), make_images(tmp_path, 1))
    stored = space.get(concept_id)
    defaults = get_method("svfit").train_defaults
    assert concept.id == concept_id and (stored.steps, stored.lr) == (defaults.steps, defaults.lr)  # no 0 placeholders
    assert stored.method_options["rank"] == 4 and stored.class_noun == "cat" and stored.base_model == "tiny"


def test_captions_are_stored_next_to_the_copies_and_read_by_training(tmp_path):
    import pandas as pd

    from app.tabs.train import caption_rows, image_captions
    from personalize.data import list_image_files, read_captions

    images = make_images(tmp_path)
    table = caption_rows(images)
    assert table.values.tolist() == [["photo 0.png", ""], ["photo 1.png", ""], ["photo 2.png", ""]]
    table.iloc[1, 1] = "  a {token} dog\n on a sofa "
    texts = image_captions(table, len(images))
    assert texts == ["", "a {token} dog on a sofa", ""]
    space = Workspace(tmp_path / "ws")
    concept = space.create(new_concept(), images, texts)
    folder = space.images_dir(concept.id)
    files = [str(p) for p in list_image_files(folder)]
    assert [Path(f).name for f in files] == concept.images  # captions are not images
    assert read_captions(files) == {files[1]: "a {token} dog on a sofa"}
    with pytest.raises(UserError, match=r"caption of photo 2\.png .*unknown placeholder \{dog\}"):
        image_captions(pd.DataFrame([["photo 2.png", "a {dog}"]], columns=["image", "caption"]), 1)


def test_masks_are_stored_next_to_the_copies_at_their_size(tmp_path):
    from app.tabs.mask_editor import drawn_mask, editor_value, mask_status
    from personalize.data import list_image_files, load_image, load_mask, mask_file

    images = make_images(tmp_path)
    turned = tmp_path / "turned.jpg"  # 80x64 stored, shown 64x80: EXIF orientation 6 (rotated 90 degrees)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 64), "gray").save(turned, exif=exif)
    images.append(str(turned))
    painted = Image.new("L", (64, 64), 0)
    painted.paste(255, (10, 10, 30, 30))
    masks = [painted, None, painted.resize((32, 32)), Image.new("L", (80, 64), 255)]
    space = Workspace(tmp_path / "ws")
    concept = space.create(new_concept(), images, masks=masks)
    folder = space.images_dir(concept.id)
    files = list_image_files(folder)
    assert [p.name for p in files] == concept.images  # masks are not images
    assert [mask_file(p).exists() for p in files] == [True, False, True, True]
    first = load_mask(mask_file(files[0]), (64, 64))
    assert first.getpixel((20, 20)) == 255 and first.getpixel((50, 50)) == 0
    assert Image.open(mask_file(files[2])).size == (64, 64)  # resized to its image
    assert Image.open(mask_file(files[3])).size == load_image(files[3]).size == (64, 80)  # upright size

    # the editor round trip: a stored mask shows as a translucent layer and saves back unchanged
    value = editor_value(images, masks, 0)  # files, as Gradio is handed them
    assert editor_value(images, masks, 0) == value  # written once
    layer = Image.open(value["layers"][0])
    assert Image.open(value["background"]).size == (64, 64) and 0 < layer.getpixel((20, 20))[3] < 255
    assert np.array_equal(np.asarray(drawn_mask({"layers": [layer]}, images[0])), np.asarray(painted))
    assert drawn_mask({"layers": []}, images[1]) is None and editor_value(images, masks, 1)["layers"] == []
    assert mask_status(images, masks) == "Masks for 3 of 4 image(s): photo 0.png, photo 2.png, turned.jpg."


def test_concept_json_of_earlier_versions_loads(tmp_path):
    space = Workspace(tmp_path)
    on = space.create(new_concept("on"), make_images(tmp_path, 1))
    off = space.create(new_concept("off"), make_images(tmp_path, 1))
    for concept, old in ((on, True), (off, False)):
        path = space.folder(concept.id) / "concept.json"
        data = json.loads(path.read_text())
        del data["prior"]
        del data["adapter_step"]  # added with the step switch
        path.write_text(json.dumps({**data, "prior_preservation": old}))
    assert (space.get(on.id).prior, space.get(off.id).prior) == ("images", "none")
    assert space.get(on.id).adapter_step is None


@functools.cache
def tiny_lora():
    """A LoRA on the tiny model, moved off zero as training would (a zero update has nothing to export)."""
    from personalize import attach
    from personalize.models import tiny_unet

    adapter = attach(tiny_unet(), "lora")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param, _ in adapter.named_trainables():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return adapter


def save_adapter_at(path: Path, step: int) -> Path:
    """The tiny LoRA saved as the trainer saves it at `step`."""
    return tiny_lora().save(path, {"base_model": "tiny", "steps": step})


def saved_run(space: Workspace, concept_id: str, final: int = 6, best: int | None = 4, checkpoints=(2, 4, 6), ema=(2,)) -> Path:
    """A run folder as the trainer leaves it: final adapter, best/ (chosen by metric tracking), checkpoints."""
    run = space.train_dir(concept_id)
    save_adapter_at(run / "adapter.safetensors", final)
    if best is not None:
        save_adapter_at(run / "best" / "adapter.safetensors", best)
        (run / "result.json").write_text(json.dumps({"best_step": best, "curves": [{"step": 0}, {"step": 2}, {"step": 4}]}))
    (run / "config.json").write_text(json.dumps({"select_by": "balanced"}))
    for step in checkpoints:
        folder = run / "checkpoints" / f"step_{step:06d}"
        save_adapter_at(folder / "adapter.safetensors", step)
        if step in ema:
            save_adapter_at(folder / "adapter_ema.safetensors", step)
        (folder / "state.json").write_text(json.dumps({"step": step}))
    return run


def test_saved_steps_list_final_best_and_checkpoints(tmp_path):
    space = Workspace(tmp_path)
    concept = space.create(new_concept(status=DONE), make_images(tmp_path, 1))
    run = saved_run(space, concept.id)
    steps = space.saved_steps(concept.id)
    assert [s.label for s in steps] == ["step 6 (final)", "step 4 (best: balanced score)", "step 2 (checkpoint)"]
    # one file per step: the final and best files over their checkpoint copies; a checkpoint's EMA weights
    assert [s.path for s in steps] == [
        run / "adapter.safetensors",
        run / "best" / "adapter.safetensors",
        run / "checkpoints" / "step_000002" / "adapter_ema.safetensors",
    ]
    assert space.latest_checkpoint(concept.id) == 6 and space.run_result(concept.id)["best_step"] == 4
    shutil.rmtree(run / "checkpoints")
    saved_run(space, concept.id, final=4, best=4, checkpoints=())  # the best step is also the last one
    assert [s.label for s in space.saved_steps(concept.id)] == ["step 4 (final, best: balanced score)"]


def test_the_default_step_is_best_else_final_and_a_choice_persists(tmp_path):
    space = Workspace(tmp_path)
    concept = space.create(new_concept(status=DONE), make_images(tmp_path, 1))
    run = saved_run(space, concept.id)
    in_use = space.adapter_in_use(concept.id)
    assert (in_use.path, in_use.saved.step, in_use.chosen, in_use.note) == (run / "best" / "adapter.safetensors", 4, False, "")

    assert space.choose_step(concept.id, 2).step == 2
    reopened = Workspace(tmp_path)  # the choice is in concept.json
    assert reopened.get(concept.id).adapter_step == 2
    assert reopened.adapter_path(concept.id) == run / "checkpoints" / "step_000002" / "adapter_ema.safetensors"
    with pytest.raises(UserError, match=r"step 3 is not a saved step of 'My Dog'; saved steps: 6, 4, 2"):
        space.choose_step(concept.id, 3)

    # a continued run pruned the chosen checkpoint: the default again, and the details say why
    shutil.rmtree(run / "checkpoints" / "step_000002")
    in_use = space.adapter_in_use(concept.id)
    assert in_use.path == run / "best" / "adapter.safetensors" and not in_use.chosen
    assert "chosen step 2 is no longer saved" in in_use.note and "step 4 (best: balanced score)" in in_use.note
    shutil.rmtree(run / "best")  # no metric tracking: the final adapter
    assert space.adapter_path(concept.id) == run / "adapter.safetensors"


def test_export_writes_a_lora_into_the_concept_folder(tmp_path):
    from safetensors import safe_open

    from app.base_model import BaseModel
    from app.exports import export_adapter
    from app.tabs.concepts import EXPORT_COLUMNS, export_frame, export_summary
    from personalize.export import READERS

    space = Workspace(tmp_path)
    concept = space.create(new_concept(status=DONE), make_images(tmp_path, 1))
    saved_run(space, concept.id, best=None, checkpoints=())
    in_use = space.adapter_in_use(concept.id)
    base = BaseModel("shapes")  # not the adapter's model: `tiny`'s UNet is loaded for the export
    output = space.new_export_path(concept.id, "kohya", in_use.saved.step)
    assert output.parent == space.folder(concept.id) / "exports" and output.name.startswith("my-dog-step6-kohya-")
    layers = []
    report = export_adapter(base, in_use.path, "kohya", output, None, 0.99, "float16", on_layer=lambda d, t, n: layers.append(d))
    assert output.is_file() and report.file_size == output.stat().st_size and layers[-1] == len(layers)
    with safe_open(str(output), framework="pt") as handle:
        assert any(key.startswith("lora_unet_") for key in handle.keys())
    frame = export_frame(report)
    assert list(frame.columns) == EXPORT_COLUMNS and len(frame) == len(report.layers) > 0
    summary = export_summary(report, in_use)
    assert "overall relative error" in summary and f"kohya format: loads in {html.escape(READERS['kohya'])}" in summary
    assert report.truncation() in summary and "(energy 0.99)" in report.truncation()

    second = space.new_export_path(concept.id, "diffusers", 6)
    report = export_adapter(base, in_use.path, "diffusers", second, None, None, "float32")  # the panel's defaults
    summary = export_summary(report, in_use)
    assert {layer.rank for layer in report.layers} == {4} and not report.truncated, "the LoRA is written at its own rank"
    assert "no layer truncated" in summary and f"diffusers format: loads in {READERS['diffusers']}" in summary
    for bad, message in (
        (dict(format="onnx"), "unknown export format 'onnx'; accepted: diffusers, kohya"),
        (dict(rank=0), "rank must be a positive integer"),
        (dict(energy=1.5), "energy must be a number in (0, 1]"),
        (dict(dtype="int8"), "unknown export dtype 'int8'; accepted: float16, bfloat16, float32"),
    ):
        options = {"format": "kohya", "rank": None, "energy": 0.99, "dtype": "float16", **bad}
        with pytest.raises(UserError, match=re.escape(message)):
            export_adapter(base, in_use.path, output=space.new_export_path(concept.id, "x", 6), **options)
    assert sorted(p.name for p in space.exports_dir(concept.id).iterdir()) == sorted([output.name, second.name])


def test_export_of_a_learned_token_says_what_each_tool_prompts_with(tmp_path):
    """Each export's embeddings go to a folder of their own, named for the prompt word; the panel's summary
    says what to write in A1111, ComfyUI and diffusers, and a second export meets none of the first's files."""
    from app.base_model import BaseModel
    from app.exports import export_adapter
    from app.tabs.concepts import export_summary
    from app.workspace import AdapterInUse
    from personalize import PipelineAdapter, attach_text_encoders, load_pipeline, new_tokens

    pipe = load_pipeline("tiny", device="cpu")
    whole = PipelineAdapter(pipe, attach_text_encoders(pipe, "lora"), new_tokens(pipe, {"<sks>": "dog"}))
    with torch.no_grad():
        for param in whole.parameters():
            param.add_(0.1)
    source = whole.save(tmp_path / "adapter.safetensors", {"base_model": "tiny", "steps": 6})
    whole.detach()
    space = Workspace(tmp_path / "space")
    concept = space.create(new_concept(status=DONE), make_images(tmp_path, 1))
    base = BaseModel("shapes")
    for _ in range(2):
        output = space.new_export_path(concept.id, "kohya", 6)
        report = export_adapter(base, source, "kohya", output, None, None, "float16")
        embedding = output.with_name(f"{output.stem}-embeddings") / "sks.safetensors"
        assert report.embeddings == {"<sks>": embedding} and embedding.is_file()
        summary = export_summary(report, AdapterInUse(path=source, saved=None, chosen=False))
        assert "in the prompt write `sks` in A1111 (file in `embeddings/`), `embedding:sks` in ComfyUI" in summary
        assert "`<sks>` in diffusers" in summary and "no layer truncated" in summary
