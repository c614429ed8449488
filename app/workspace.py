"""The concept library on disk: one folder per learned concept, surviving app restarts.

Layout of a workspace:

    <workspace>/concepts/<id>/concept.json     what the Concepts tab lists (name, method, status, size, ...)
    <workspace>/concepts/<id>/images/          copies of the training images (with their caption .txt and .mask.png files)
    <workspace>/concepts/<id>/train/           the trainer's output folder (adapter.safetensors, result.json, samples/,
                                               checkpoints/step_XXXXXX/, best/adapter.safetensors)
    <workspace>/concepts/<id>/generated/<run>/ generated images with manifest.jsonl, one folder per Generate click
    <workspace>/concepts/<id>/evaluations/<run>/report.json (+ .md, .png)
    <workspace>/concepts/<id>/exports/         LoRA files exported from the concept's adapter
    <workspace>/generated/<run>/               images generated with the base model only

Every file is written atomically; a deleted concept is first renamed out of the library, so a crash
never leaves a half-deleted concept listed.

A run saves several adapters: the final one, the best validation step's (`best/`, chosen by metric
tracking) and each checkpoint's. `saved_steps` lists them; the concept's `adapter_step` is the one the
user chose, and `adapter_path` the file every tab generates and exports with: the chosen step's, else
the best step's, else the final one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image

from personalize.atomic import atomic_path, write_json_atomic, write_text_atomic
from personalize.data import IMAGE_SUFFIXES, caption_file, is_mask_file, mask_file
from personalize.errors import UserError
from personalize.io import saved_step
from personalize.train import TrainConfig
from personalize.training.checkpoint import EMA_ADAPTER_FILE, list_checkpoints
from personalize.training.config import upgrade_legacy
from personalize.training.outputs import ADAPTER_FILE, BEST_DIR, CHECKPOINTS_DIR, CONFIG_FILE, RESULT_FILE

log = logging.getLogger(__name__)

CONCEPT_FILE = "concept.json"
MAX_NAME_LENGTH = 80

# Status of a concept: the app shows it, and only finished ones (with an adapter) can generate.
TRAINING, DONE, STOPPED, FAILED, INTERRUPTED = "training", "done", "stopped", "failed", "interrupted"
UNTRAINED = "untrained"  # stopped before the first step (e.g. while the model loaded): nothing was learned
USABLE = (DONE, STOPPED)
# What a saved step of a run is (one step can be both final and best).
FINAL, BEST, CHECKPOINT = "final", "best", "checkpoint"
# How the Concepts tab names the rule that chose the best step (TrainConfig.select_by).
SELECTION_NAMES = {"balanced": "balanced score", "fidelity": "fidelity", "alignment": "prompt alignment", "last": "last validation"}


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Concept:
    """What concept.json stores about one learned concept."""

    id: str  # folder name; stable across renames
    name: str
    method: str
    base_model: str
    token: str
    class_noun: str
    steps: int  # steps asked for
    lr: float
    method_options: dict[str, Any] = field(default_factory=dict)
    prior: str = "images"  # TrainConfig.prior: images | model | none
    images: list[str] = field(default_factory=list)  # file names inside images/
    created: str = ""
    status: str = TRAINING
    steps_done: int = 0
    num_trainable: int | None = None
    file_size: int | None = None
    wall_time: float | None = None
    message: str = ""  # why training failed, for the Concepts tab
    adapter_step: int | None = None  # the saved step the user generates with; None = the default (best, else final)

    @classmethod
    def from_config(cls, concept_id: str, name: str, config: TrainConfig) -> Concept:
        """The record of a concept about to train with `config` (an effective config: steps and lr filled in)."""
        return cls(
            id=concept_id,
            name=name,
            method=config.method,
            base_model=config.base_model,
            token=config.token,
            class_noun=config.class_noun,
            steps=config.steps,
            lr=config.lr,
            method_options=dict(config.method_options),
            prior=config.prior,
        )

    @property
    def prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"

    @property
    def usable(self) -> bool:
        return self.status in USABLE


@dataclass(frozen=True)
class SavedStep:
    """One adapter file of a concept's run: its step and what that step is (final, best, checkpoint)."""

    step: int
    path: Path
    kinds: tuple[str, ...]
    best_by: str = ""  # for the best step: the rule that chose it (e.g. "balanced score")

    @property
    def label(self) -> str:
        names = [f"{kind}: {self.best_by}" if kind == BEST and self.best_by else kind for kind in self.kinds]
        return f"step {self.step} ({', '.join(names)})"


@dataclass(frozen=True)
class AdapterInUse:
    """The adapter file a concept generates and exports with, and why it is that one."""

    path: Path
    saved: SavedStep | None  # the listed step this file is (None: nothing saved yet)
    chosen: bool  # the user picked this step (else it is the default: best, else final)
    note: str = ""  # why the user's choice is not used (its file is gone)


def check_name(name: str) -> str:
    name = " ".join(str(name or "").split())
    if not name:
        raise UserError("the concept name is empty; give a short name such as 'my dog'")
    if len(name) > MAX_NAME_LENGTH:
        raise UserError(f"the concept name '{name[:20]}...' is {len(name)} characters long; at most {MAX_NAME_LENGTH} are accepted")
    return name


def slug(name: str) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return text[:40] or "concept"


def upright_size(image: Path) -> tuple[int, int]:
    """(width, height) of `image` as training sees it: after its EXIF orientation (read from the header only)."""
    with Image.open(image) as opened:
        width, height = opened.size
        turned = opened.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # rotated by 90 or 270 degrees
    return (height, width) if turned else (width, height)


def write_mask(image: Path, mask: Image.Image) -> None:
    """`mask` (white = subject) as `image`'s mask file, grayscale at the image's upright size."""
    mask = mask.convert("L")
    size = upright_size(image)
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    with atomic_path(mask_file(image)) as tmp:
        mask.save(tmp, format="PNG")


class Workspace:
    """The concepts of one workspace folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.concepts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot use '{self.root}' as the workspace folder: {exc.strerror}") from exc

    @property
    def concepts_dir(self) -> Path:
        return self.root / "concepts"

    @property
    def demo_dir(self) -> Path:
        """Where the demo concept's images are written before they are offered as an upload."""
        return self.root / "demo"

    # --- paths --------------------------------------------------------------------------------
    def folder(self, concept_id: str) -> Path:
        if not re.fullmatch(r"[a-z0-9-]+", concept_id or ""):
            raise UserError(f"'{concept_id}' is not a concept id of this workspace")
        return self.concepts_dir / concept_id

    def images_dir(self, concept_id: str) -> Path:
        return self.folder(concept_id) / "images"

    def train_dir(self, concept_id: str) -> Path:
        return self.folder(concept_id) / "train"

    def adapter_path(self, concept_id: str) -> Path:
        """The adapter file the concept generates and exports with (see `adapter_in_use`)."""
        return self.adapter_in_use(concept_id).path

    def exports_dir(self, concept_id: str) -> Path:
        return self.folder(concept_id) / "exports"

    def new_export_path(self, concept_id: str, format: str, step: int | None) -> Path:
        """A fresh file name for one export: `<name>-step<N>-<format>-<time>.safetensors`."""
        concept = self.get(concept_id)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        at_step = f"-step{step}" if step is not None else ""
        base = self.exports_dir(concept_id) / f"{slug(concept.name)}{at_step}-{format}-{stamp}"
        path, number = base.with_name(base.name + ".safetensors"), 1
        while path.exists():
            number += 1
            path = base.with_name(f"{base.name}-{number}.safetensors")
        return path

    def generated_dir(self, concept_id: str | None) -> Path:
        return self.folder(concept_id) / "generated" if concept_id else self.root / "generated"

    def evaluation_dir(self, concept_id: str, run: str) -> Path:
        return self.folder(concept_id) / "evaluations" / run

    def new_generation_dir(self, concept_id: str | None) -> Path:
        """A fresh folder for one Generate click (time-stamped, so runs sort by time)."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = self.generated_dir(concept_id)
        run, number = base / stamp, 1
        while run.exists():
            number += 1
            run = base / f"{stamp}-{number}"
        return run

    def generation_runs(self, concept_id: str) -> list[str]:
        """Names of the concept's generation folders that hold a manifest, newest first."""
        base = self.generated_dir(concept_id)
        if not base.is_dir():
            return []
        return sorted((p.name for p in base.iterdir() if (p / "manifest.jsonl").is_file()), reverse=True)

    def samples(self, concept_id: str) -> list[Path]:
        """Validation grids written during training, oldest first."""
        folder = self.train_dir(concept_id) / "samples"
        return sorted(folder.glob("*.png")) if folder.is_dir() else []

    def preview_image(self, concept_id: str) -> Path | None:
        """The latest validation grid, else the first training image."""
        samples = self.samples(concept_id)
        if samples:
            return samples[-1]
        folder = self.images_dir(concept_id)
        images = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_file(p)) if folder.is_dir() else []
        )
        return images[0] if images else None

    # --- saved steps of a run -------------------------------------------------------------------
    def saved_steps(self, concept_id: str) -> list[SavedStep]:
        """The adapters of the concept's run, latest step first: final, best and each checkpoint
        (its EMA weights when the run kept an average). A step saved twice is listed once."""
        run = self.train_dir(concept_id)
        found: dict[int, SavedStep] = {}
        for kind, path in ((FINAL, run / ADAPTER_FILE), (BEST, run / BEST_DIR / ADAPTER_FILE)):
            step = saved_step(path)
            if step is None:
                continue
            earlier = found.get(step, SavedStep(step, path, ()))
            best_by = self.selection_name(concept_id) if kind == BEST else earlier.best_by
            found[step] = dataclasses.replace(earlier, kinds=(*earlier.kinds, kind), best_by=best_by)
        for step, folder in list_checkpoints(run / CHECKPOINTS_DIR):
            averaged = folder / EMA_ADAPTER_FILE  # with EMA, the weights to generate with
            found.setdefault(step, SavedStep(step, averaged if averaged.is_file() else folder / ADAPTER_FILE, (CHECKPOINT,)))
        return sorted(found.values(), key=lambda saved: saved.step, reverse=True)

    def latest_checkpoint(self, concept_id: str) -> int | None:
        """The step of the run's latest complete checkpoint (what a continued run resumes from), if any."""
        found = list_checkpoints(self.train_dir(concept_id) / CHECKPOINTS_DIR)
        return found[-1][0] if found else None

    def selection_name(self, concept_id: str) -> str:
        """How the run chose its best step (its config's select_by, named for people); empty if unknown."""
        rule = self.run_file(concept_id, CONFIG_FILE).get("select_by", "")
        return SELECTION_NAMES.get(rule, str(rule))

    def run_result(self, concept_id: str) -> dict[str, Any]:
        """The run's result.json (best_step, curves, ...); empty while none was written or when unreadable."""
        return self.run_file(concept_id, RESULT_FILE)

    def run_file(self, concept_id: str, name: str) -> dict[str, Any]:
        """A JSON file of the run folder as a dict; empty when missing or unreadable (logged)."""
        path = self.train_dir(concept_id) / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def adapter_in_use(self, concept_id: str) -> AdapterInUse:
        """The step the user chose while its file exists; otherwise the default, the best validation
        step's adapter, else the final one (with a note when the chosen file has gone)."""
        concept = self.get(concept_id)
        steps = self.saved_steps(concept_id)
        if concept.adapter_step is not None:
            chosen = next((saved for saved in steps if saved.step == concept.adapter_step), None)
            if chosen is not None:
                return AdapterInUse(chosen.path, chosen, chosen=True)
        best = self.train_dir(concept_id) / BEST_DIR / ADAPTER_FILE
        kind, path = (BEST, best) if best.is_file() else (FINAL, self.train_dir(concept_id) / ADAPTER_FILE)
        saved = next((s for s in steps if kind in s.kinds), None)
        note = ""
        if concept.adapter_step is not None:
            instead = saved.label if saved else "no saved step"
            note = f"the chosen step {concept.adapter_step} is no longer saved (a continued run removed it); using {instead} instead"
        return AdapterInUse(path, saved, chosen=False, note=note)

    def choose_step(self, concept_id: str, step: int) -> SavedStep:
        """Generate and export `concept_id` with its saved step `step` from now on; returns that step."""
        concept = self.get(concept_id)
        steps = self.saved_steps(concept_id)
        chosen = next((saved for saved in steps if saved.step == step), None)
        if chosen is None:
            accepted = ", ".join(str(saved.step) for saved in steps) or "none: the concept has no saved adapter yet"
            raise UserError(f"step {step} is not a saved step of '{concept.name}'; saved steps: {accepted}")
        concept.adapter_step = step
        self.save(concept)
        return chosen

    # --- reading ------------------------------------------------------------------------------
    def concepts(self) -> list[Concept]:
        """Every concept, newest first; unreadable concept.json files are skipped with a log line."""
        found = []
        for folder in self.concepts_dir.iterdir():
            if folder.name.startswith(".") or not (folder / CONCEPT_FILE).is_file():
                continue
            try:
                found.append(self._read(folder))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping %s: unreadable %s (%s)", folder, CONCEPT_FILE, exc)
        return sorted(found, key=lambda c: (c.created, c.id), reverse=True)

    def get(self, concept_id: str) -> Concept:
        folder = self.folder(concept_id)
        if not (folder / CONCEPT_FILE).is_file():
            raise UserError(f"there is no concept '{concept_id}' in the workspace {self.root}; it may have been deleted")
        return self._read(folder)

    def _read(self, folder: Path) -> Concept:
        data = json.loads((folder / CONCEPT_FILE).read_text(encoding="utf-8"))
        data = upgrade_legacy(data)  # concept.json of earlier versions: prior_preservation -> prior
        known = {f.name for f in dataclasses.fields(Concept)}
        return Concept(**{k: v for k, v in data.items() if k in known})

    def find_by_name(self, name: str) -> Concept | None:
        wanted = name.casefold()
        return next((c for c in self.concepts() if c.name.casefold() == wanted), None)

    # --- writing ------------------------------------------------------------------------------
    def save(self, concept: Concept) -> None:
        write_json_atomic(self.folder(concept.id) / CONCEPT_FILE, dataclasses.asdict(concept))

    def create(
        self, concept: Concept, images: list[str], captions: list[str] | None = None, masks: list[Image.Image | None] | None = None
    ) -> Concept:
        """Store a new concept: a fresh folder, copies of `images` (with `captions[i]`, where not empty, as
        image i's caption file, and `masks[i]`, where given, as its `.mask.png`: both read by training),
        concept.json; sets created, and the id unless one was reserved with `new_id`."""
        concept.name = check_name(concept.name)
        if self.find_by_name(concept.name):
            raise UserError(f"a concept named '{concept.name}' already exists; choose another name or delete it first")
        concept.id = concept.id or self.new_id(concept.name)
        concept.created = concept.created or now_iso()
        target = self.images_dir(concept.id)
        target.mkdir(parents=True)
        names = []
        for index, source in enumerate(images):
            source = Path(source)
            name = f"{index:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', source.name)}"
            with atomic_path(target / name) as tmp:
                shutil.copyfile(source, tmp)
            if captions and index < len(captions) and captions[index].strip():
                write_text_atomic(caption_file(target / name), captions[index].strip() + "\n")
            if masks and index < len(masks) and masks[index] is not None:
                write_mask(target / name, masks[index])
            names.append(name)
        concept.images = names
        self.save(concept)
        return concept

    def new_id(self, name: str) -> str:
        """A free folder name for a concept called `name` (its paths are known before it is created)."""
        base = slug(name)
        concept_id = base
        while self.folder(concept_id).exists():
            concept_id = f"{base}-{uuid.uuid4().hex[:6]}"
        return concept_id

    def rename(self, concept_id: str, new_name: str) -> Concept:
        concept = self.get(concept_id)
        new_name = check_name(new_name)
        other = self.find_by_name(new_name)
        if other is not None and other.id != concept_id:
            raise UserError(f"a concept named '{new_name}' already exists; choose another name")
        concept.name = new_name
        self.save(concept)
        return concept

    def delete(self, concept_id: str) -> Concept:
        concept = self.get(concept_id)
        folder = self.folder(concept_id)
        trash = self.concepts_dir / f".deleted-{concept_id}-{uuid.uuid4().hex[:6]}"
        os.replace(folder, trash)  # one rename: the concept leaves the library at once
        shutil.rmtree(trash, ignore_errors=True)
        return concept

    def recover(self) -> list[Concept]:
        """Tidy up after an app that exited mid-way (call at start-up, before any job): finish
        interrupted deletions and mark concepts left 'training' as interrupted (or stopped when
        their adapter was saved). Returns the concepts marked."""
        for trash in self.concepts_dir.glob(".deleted-*"):
            shutil.rmtree(trash, ignore_errors=True)
        stale = [c for c in self.concepts() if c.status == TRAINING]
        for concept in stale:
            concept.status = INTERRUPTED
            concept.message = "the app stopped while this concept was training"
            if self.adapter_path(concept.id).is_file():
                concept.status = STOPPED
            self.save(concept)
        return stale
