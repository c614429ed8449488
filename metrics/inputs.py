"""Reading evaluation inputs: real images per subject, and generated images with their prompts and tokens."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

from metrics.images import IMAGE_SUFFIXES, list_images, png_text

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
PathLike = Union[str, os.PathLike]
RealSource = Union[PathLike, Mapping[str, Sequence[PathLike]]]
ACCEPTED_IMAGES = f"{', '.join(IMAGE_SUFFIXES)} files"


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image and what made it (from manifest.jsonl or the PNG's text chunks)."""

    path: Path
    prompt: str | None
    subject: str | None
    tokens: tuple[str, ...]
    methods: tuple[str, ...]
    base_model: str | None


def _existing_folder(folder: PathLike, what: str) -> Path:
    path = Path(folder).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{what} must be a folder, got the file {path}")
    return path


def read_real(real: RealSource) -> dict[str, list[Path]]:
    """Subject name -> real image paths, from a folder, a folder of subject folders, or a mapping."""
    if isinstance(real, Mapping):
        subjects = {}
        for subject, paths in real.items():
            files = [Path(p).expanduser() for p in paths]
            if not files:
                raise ValueError(f"real subject {subject!r} has no images; give at least one image path")
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"real image of subject {subject!r} not found: {file}")
            subjects[str(subject)] = files
        if not subjects:
            raise ValueError("the real-image mapping is empty; give subject -> list of image paths")
        return subjects
    folder = _existing_folder(real, "real image")
    images = list_images(folder)
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if images:
        if subfolders:
            logger.warning("%s has images at its top level: treated as one subject, subfolders ignored", folder)
        return {folder.name: images}
    subjects = {sub.name: list_images(sub) for sub in subfolders}
    subjects = {name: files for name, files in subjects.items() if files}
    if not subjects:
        raise ValueError(
            f"no images in the real image folder {folder}; accepted: {ACCEPTED_IMAGES} directly in it "
            "(one subject) or in one subfolder per subject"
        )
    return subjects


def _record_to_image(folder: Path, record: Mapping, where: str) -> GeneratedImage:
    if not isinstance(record, Mapping) or not isinstance(record.get("file"), str):
        raise ValueError(f"{where}: each record must be a JSON object with a 'file' string")
    path = folder / record["file"]
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{where}: 'file' {record['file']!r} is outside the generated image folder {folder}; accepted: a file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    adapters = record.get("adapters") or []
    if not isinstance(adapters, list) or not all(isinstance(a, Mapping) for a in adapters):
        raise ValueError(f"{where}: 'adapters' must be a list of JSON objects, got {adapters!r}")
    prompt = record.get("prompt")
    subject = record.get("subject")
    return GeneratedImage(
        path=path,
        prompt=str(prompt) if prompt is not None else None,
        subject=str(subject) if subject is not None else None,
        tokens=tuple(str(a["token"]) for a in adapters if a.get("token")),
        methods=tuple(str(a["method"]) for a in adapters if a.get("method")),
        base_model=record.get("base_model"),
    )


def _read_manifest(folder: Path) -> list[GeneratedImage]:
    manifest = folder / MANIFEST
    images = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from err
        images.append(_record_to_image(folder, record, where))
    return images


def _read_png_metadata(folder: Path) -> list[GeneratedImage]:
    images = []
    for path in list_images(folder):
        text = png_text(path)
        if "parameters" in text:
            try:
                record = json.loads(text["parameters"])
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: the 'parameters' PNG text is not valid JSON: {err}") from err
            images.append(_record_to_image(folder, {**record, "file": path.name}, str(path)))
        else:
            images.append(GeneratedImage(path, text.get("prompt"), text.get("subject"), (), (), None))
    return images


def read_generated(generated: PathLike) -> tuple[list[GeneratedImage], str]:
    """The generated images of a folder and where their metadata came from ("manifest.jsonl" or "png text")."""
    folder = _existing_folder(generated, "generated image")
    if (folder / MANIFEST).is_file():
        images, source = _read_manifest(folder), MANIFEST
    else:
        images, source = _read_png_metadata(folder), "png text"
    if not images:
        raise ValueError(
            f"no images in the generated image folder {folder}; accepted: {ACCEPTED_IMAGES}, listed in "
            f"{MANIFEST} or carrying a 'prompt' PNG text field"
        )
    return images, source


def group_by_subject(real: Mapping[str, list[Path]], generated: Sequence[GeneratedImage]) -> dict[str, list[GeneratedImage]]:
    """Real subject -> its generated images; a single real subject takes all unlabelled images."""
    names = {image.subject for image in generated}
    if None in names and len(names) > 1:
        unlabelled = next(image.path for image in generated if image.subject is None)
        raise ValueError(f"some generated images have a subject and some do not (first without: {unlabelled})")
    if len(real) == 1 and len(names) == 1:
        (subject,), (name,) = real, names
        if name is not None and name != subject:
            logger.info("generated subject %r is paired with the only real subject %r", name, subject)
        return {subject: list(generated)}
    if names == {None}:
        raise ValueError(
            f"the generated images carry no subject but there are {len(real)} real subjects "
            f"({', '.join(real)}); write 'subject' into each {MANIFEST} record"
        )
    unknown = sorted(names - set(real))
    if unknown:
        raise ValueError(f"generated subject(s) {', '.join(map(repr, unknown))} have no real images; real subjects: {', '.join(real)}")
    return {subject: [im for im in generated if im.subject == subject] for subject in real if subject in names}
