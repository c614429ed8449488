"""DreamBench batch evaluation (DreamBooth, Ruiz et al. 2023): for every subject, 25 prompts x 4 images per
adapter method, then DINO / CLIP-I / CLIP-T / Vendi per method and one comparison across methods.

SUBJECTS is a folder with one subfolder of photos per subject, named as in DreamBench (dog, backpack,
...: the class noun comes from metrics/data/dreambench.json); other names need --class-noun NAME=NOUN.
Give either --methods (one adapter is trained per subject and method first) or --adapters (trained
adapter files). Image generation is shared out over the processes of `accelerate launch`, and a rerun
skips every image already on disk (a PNG is reused only if it is complete, every chunk intact, and was
rendered for the same adapter, prompt, seed and sampling settings). On CPUs, start several processes
with `accelerate launch --multi_gpu --num_processes N` (accelerate's `--cpu` flag starts only one).

Writes into --output, per method: adapters/<subject>/ (with --methods), images/<subject>/*.png +
images/manifest.jsonl, report.json / report.md / report.png; and comparison.json / .md / .png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import _common as common
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from metrics import load_dreambench, markdown_table, write_comparison
from personalize.atomic import atomic_path, write_text_atomic
from personalize.data import list_image_files
from personalize.errors import UserError
from personalize.generate import AdapterSpec, GeneratedImage, generate
from personalize.io import adapter_info
from personalize.models import load_pipeline
from personalize.train import TrainConfig

log = logging.getLogger("examples.dreambench")

JOB_TEXT = "dreambench_job"  # PNG text field: the job an image was rendered for (what a rerun compares)
ADAPTER_FILE = "adapter.safetensors"  # the file name a training run writes
MANIFEST = "manifest.jsonl"

EPILOG = """examples:
  # train LoRA and SVFit on every subject, then evaluate (8 GPUs share the work)
  accelerate launch --num_processes 8 examples/dreambench.py dreambench/dataset --methods lora,svfit
  # evaluate adapters trained before: a folder per method with <subject>/adapter.safetensors or <subject>.safetensors
  python examples/dreambench.py dreambench/dataset --adapters runs/lora runs/svfit
  # smoke test on the built-in tiny model, two CPU processes
  accelerate launch --multi_gpu --num_processes 2 examples/dreambench.py subjects/ --methods lora \\
      --base-model tiny --embedders tiny --steps 2 --prior none \\
      --prompts-per-subject 2 --images-per-prompt 2 --sample-steps 2
"""


@dataclass(frozen=True)
class Subject:
    """One subject folder and how the DreamBench prompts name it."""

    name: str
    folder: Path
    class_noun: str
    live: bool  # live subjects (cats, dogs) get DreamBench's live-subject prompts


@dataclass(frozen=True)
class Job:
    """One image to render: everything that decides its pixels, plus where it goes."""

    run: str  # adapter method (the report the image belongs to)
    subject: str
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    adapter: str
    base_model: str
    steps: int
    guidance: float

    @property
    def file(self) -> str:
        """Path relative to the run's images folder."""
        return f"{self.subject}/{self.prompt_index:02d}_{self.image_index}.png"

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, EPILOG)
    parser.add_argument(
        "subjects", type=Path, metavar="SUBJECTS", help="folder with one subfolder of photos per subject, named as in DreamBench"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--methods", metavar="LIST", help="comma-separated adapter methods: train one adapter per subject and method, then evaluate"
    )
    source.add_argument(
        "--adapters",
        nargs="+",
        metavar="PATH",
        help="trained adapters: a folder with <subject>.safetensors or <subject>/adapter.safetensors "
        "files, an adapter file inside such a layout, or SUBJECT=FILE; one report per method",
    )
    parser.add_argument(
        "--class-noun",
        action="append",
        default=[],
        metavar="NAME=NOUN",
        help="class noun of a subject folder that is not a DreamBench subject, or to override one "
        "(repeatable), e.g. --class-noun my_mug=mug",
    )
    parser.add_argument("--only", metavar="LIST", help="comma-separated subset of the subject folders to use")
    parser.add_argument(
        "--prompts-per-subject",
        type=int,
        default=25,
        metavar="N",
        help="use the first N of the 25 DreamBench prompts (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=common.default_output(__file__),
        metavar="DIR",
        help="output folder; a rerun with the same folder continues where the last one stopped (default: %(default)s)",
    )
    common.add_model_arguments(parser)
    common.add_training_arguments(
        parser,
        steps_help="training steps per adapter with --methods "
        "(default: each method's paper value); under K processes each step averages K batches (DDP)",
    )
    common.add_generation_arguments(parser, images_per_prompt=load_dreambench()["images_per_prompt"])
    common.add_evaluation_arguments(parser)
    return parser


# --- subjects and prompts -----------------------------------------------------------------------------------


def read_subjects(folder: Path, class_nouns: Mapping[str, str], only: Sequence[str] | None = None) -> list[Subject]:
    """The subject subfolders of `folder` with their class nouns (DreamBench's, else from `class_nouns`)."""
    if not folder.is_dir():
        raise UserError(f"subjects folder not found: '{folder}' (expected a folder with one subfolder per subject)")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(
            f"'{folder}' has no subject subfolders; put each subject's photos in a subfolder named after it (e.g. dog/, backpack/)"
        )
    for flag, wanted in (("--only", only or []), ("--class-noun", class_nouns)):
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise UserError(
                f"{flag} names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                f"a subfolder of '{folder}'; subjects there: {', '.join(names)}"
            )
    names = [name for name in names if not only or name in only]
    data = load_dreambench()
    unknown = [name for name in names if name not in data["subjects"] and name not in class_nouns]
    if unknown:
        raise UserError(
            f"subject folder(s) {', '.join(unknown)} are not DreamBench subjects, so their class noun is "
            f"unknown; pass --class-noun NAME=NOUN for each (e.g. --class-noun {unknown[0]}=NOUN) or "
            f"rename them; DreamBench subjects: {', '.join(data['subjects'])}"
        )
    live_nouns = {data["subjects"][name] for name in data["live_subjects"]}
    subjects = []
    for name in names:
        noun = class_nouns.get(name) or data["subjects"][name]
        live = name in data["live_subjects"] if name in data["subjects"] else noun in live_nouns
        subjects.append(Subject(name, folder / name, noun, live))
    return subjects


def check_prompt_count(count: int) -> None:
    available = len(load_dreambench()["object_prompts"])  # 25, as many as the live-subject prompts
    if not 1 <= count <= available:
        raise UserError(f"--prompts-per-subject must be between 1 and {available}, got {count}")


def subject_prompts(subject: Subject, token: str, count: int) -> list[str]:
    """The first `count` DreamBench prompts of `subject` (live or object set), with its token and class noun."""
    data = load_dreambench()
    templates = data["live_prompts"] if subject.live else data["object_prompts"]
    return [template.format(token, subject.class_noun) for template in templates[:count]]


# --- adapters -----------------------------------------------------------------------------------------------


def _adapter_in(folder: Path, subject: str) -> Path | None:
    for candidate in (folder / f"{subject}.safetensors", folder / subject / ADAPTER_FILE):
        if candidate.is_file():
            return candidate
    return None


def _subject_of(file: Path, names: Sequence[str]) -> str | None:
    """The subject an adapter file belongs to by its layout: <subject>.safetensors or <subject>/adapter.safetensors."""
    for name in (file.stem, file.parent.name):
        if name in names:
            return name
    return None


def collect_adapters(items: Sequence[str], subjects: Sequence[Subject]) -> dict[str, dict[str, Path]]:
    """run (the adapter's method) -> subject -> adapter file, from --adapters items."""
    names = [s.name for s in subjects]
    found: list[tuple[str, Path]] = []
    for item in items:
        subject, sep, path_text = item.partition("=")
        path = Path(path_text if sep else item).expanduser()
        if sep and subject not in names:
            raise UserError(f"--adapters {item}: '{subject}' is not a subject; subjects: {', '.join(names)}")
        if path.is_dir() and not sep:
            pairs = [(name, file) for name in names if (file := _adapter_in(path, name)) is not None]
            if not pairs:
                raise UserError(
                    f"--adapters {item}: no adapter for any subject in this folder; expected "
                    f"<subject>.safetensors or <subject>/{ADAPTER_FILE} for subjects {', '.join(names)}"
                )
            found += pairs
        elif path.is_file():
            owner = subject if sep else _subject_of(path, names)
            if owner is None:
                raise UserError(
                    f"--adapters {item}: cannot tell which subject this adapter is for; name it "
                    f"<subject>.safetensors or <subject>/{ADAPTER_FILE}, or write SUBJECT={path}"
                )
            found.append((owner, path))
        else:
            raise UserError(f"--adapters {item}: '{path}' does not exist (expected an adapter file or a folder of them)")
    runs: dict[str, dict[str, Path]] = {}
    for subject, file in found:
        method = adapter_info(file)["method"]
        earlier = runs.setdefault(method, {}).get(subject)
        if earlier is not None and earlier.resolve() != file.resolve():
            raise UserError(
                f"two {method} adapters for subject '{subject}' ({earlier} and {file}); evaluate them with separate --output folders"
            )
        runs[method][subject] = file
    for method, per_subject in runs.items():
        missing = [name for name in names if name not in per_subject]
        if missing:
            log.warning("%s: no adapter for subject(s) %s; its report leaves them out", method, ", ".join(missing))
    return runs


def train_adapters(methods: Sequence[str], subjects: Sequence[Subject], args: argparse.Namespace, out: Path) -> dict[str, dict[str, Path]]:
    """Train (or finish, or reuse) one adapter per method and subject; every process takes part (DDP)."""
    runs: dict[str, dict[str, Path]] = {}
    total = len(methods) * len(subjects)
    for m, method in enumerate(methods):
        for s, subject in enumerate(subjects):
            log.info("[%d/%d] %s on %s", m * len(subjects) + s + 1, total, method, subject.name)
            config: TrainConfig = common.train_config(
                args, subject.folder, out / method / "adapters" / subject.name, method, subject.class_noun, resume=True
            )
            result = common.train_adapter(config)
            runs.setdefault(method, {})[subject.name] = Path(result.adapter_path)
    return runs


# --- jobs, sharding, resume ---------------------------------------------------------------------------------


def plan_jobs(runs: Mapping[str, Mapping[str, Path]], subjects: Sequence[Subject], args: argparse.Namespace) -> list[Job]:
    """Every image of the benchmark, ordered run -> subject -> prompt -> image (neighbours share an adapter)."""
    jobs = []
    for run, per_subject in runs.items():
        for subject in subjects:
            adapter = per_subject.get(subject.name)
            if adapter is None:
                continue
            token = adapter_info(adapter)["metadata"].get("token") or args.token
            for p, prompt in enumerate(subject_prompts(subject, token, args.prompts_per_subject)):
                jobs += [
                    Job(
                        run,
                        subject.name,
                        p,
                        i,
                        prompt,
                        args.seed + i,
                        str(adapter.resolve()),
                        args.base_model,
                        args.sample_steps,
                        args.guidance,
                    )
                    for i in range(args.images_per_prompt)
                ]
    return jobs


def is_done(path: Path, job: Job) -> bool:
    """True if `path` is a complete PNG rendered for exactly `job` (its text says so, every chunk checks out)."""
    try:
        with Image.open(path) as image:
            if image.info.get(JOB_TEXT) != job.text():  # text chunks precede the pixels: read at open
                return False
            image.verify()  # reads every chunk and its checksum without decoding: a cut-short file fails here
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def render_groups(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs that one generate() call renders: same run, subject and prompt, consecutive seeds."""
    groups: list[list[Job]] = []
    for job in jobs:
        last = groups[-1][-1] if groups else None
        if (
            last is not None
            and len(groups[-1]) < batch_size
            and (last.run, last.subject, last.prompt_index) == (job.run, job.subject, job.prompt_index)
            and job.image_index == last.image_index + 1
        ):
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def save_image(item: GeneratedImage, job: Job, images_dir: Path) -> None:
    """The PNG with the manifest record ('parameters') and the job it answers, written atomically."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(item.record(job.file)))
    info.add_text(JOB_TEXT, job.text())
    with atomic_path(images_dir / job.file) as tmp:
        item.image.save(tmp, format="PNG", pnginfo=info)


def generate_share(pipe, jobs: Sequence[Job], out: Path, batch_size: int, position: int, label: str) -> None:
    """Render this process's jobs, a progress bar per process."""
    with tqdm(total=len(jobs), desc=f"generate {label}", unit="img", position=position) as bar:
        for group in render_groups(jobs, batch_size):
            first = group[0]
            items = generate(
                pipe,
                [first.prompt],
                adapters=[AdapterSpec(first.adapter)],
                num_images=len(group),
                seed=first.seed,
                steps=first.steps,
                guidance=first.guidance,
                subject=first.subject,
                batch_size=batch_size,
            )
            for job, item in zip(group, items):
                assert item.seed == job.seed, (item.seed, job.seed)
                save_image(item, job, out / job.run / "images")
            bar.update(len(group))


def write_manifest(images_dir: Path, jobs: Sequence[Job]) -> None:
    """manifest.jsonl of one run from its PNGs' records (this run's jobs only, in job order)."""
    lines = []
    for job in jobs:
        with Image.open(images_dir / job.file) as image:
            record = json.loads(image.info["parameters"])
        lines.append(json.dumps({**record, "file": job.file}) + "\n")
    write_text_atomic(images_dir / MANIFEST, "".join(lines))


# --- the run ------------------------------------------------------------------------------------------------


def process_state():
    """accelerate's view of this process: rank, process count, device. CPU processes need cpu=True to form a group."""
    from accelerate import PartialState
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    several = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1) > 1
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not torch.cuda.is_available()))


def evaluate_runs(
    runs: Mapping[str, Mapping[str, Path]], subjects: Sequence[Subject], jobs: Sequence[Job], args: argparse.Namespace
) -> None:
    """Per run: manifest, report.json/.md/.png; then the comparison of all runs (main process)."""
    out: Path = args.output
    real = {s.name: list_image_files(s.folder, what=f"images of subject '{s.name}'") for s in subjects}
    reports = {}
    for run, per_subject in runs.items():
        images_dir = out / run / "images"
        write_manifest(images_dir, [job for job in jobs if job.run == run])
        run_real = {name: files for name, files in real.items() if name in per_subject}
        reports[run], _ = common.evaluate_run(run_real, images_dir, out / run / "report.json", args)
    paths = write_comparison(reports, out)
    print()
    print(markdown_table(reports))
    common.print_written(
        [
            *(common.Written(f"{run} report", out / run / "report.md") for run in runs),
            *(common.Written(f"comparison ({kind})", path) for kind, path in paths.items()),
        ]
    )


def run(args: argparse.Namespace) -> int:
    from accelerate.utils import broadcast_object_list

    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    class_nouns = common.parse_pairs(args.class_noun, "--class-noun", "NAME=NOUN")
    subjects = read_subjects(args.subjects, class_nouns, only)
    methods = common.parse_methods(args.methods) if args.methods else None
    common.check_generation_arguments(args)
    check_prompt_count(args.prompts_per_subject)
    state = process_state()
    if not state.is_main_process:
        for name in common.INFO_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if methods:
        runs = train_adapters(methods, subjects, args, args.output)
    else:
        runs = collect_adapters(args.adapters, subjects)
    jobs = plan_jobs(runs, subjects, args)

    # The main process decides what is left to render and tells the others, so all split the same list.
    pending = [
        [i for i, job in enumerate(jobs) if not is_done(args.output / job.run / "images" / job.file, job)]
        if state.is_main_process
        else None
    ]
    broadcast_object_list(pending)
    todo = [jobs[i] for i in pending[0]]
    if state.is_main_process:
        print(
            f"{len(jobs)} images in the benchmark, {len(jobs) - len(todo)} already on disk, {len(todo)} to render "
            f"on {state.num_processes} process(es)"
        )
    with state.split_between_processes(todo) as share:
        if share:
            pipe = load_pipeline(args.base_model, device=state.device)
            label = f"[{state.process_index + 1}/{state.num_processes}]"
            generate_share(pipe, share, args.output, args.batch_size, state.process_index, label)
    state.wait_for_everyone()
    if state.is_main_process:
        evaluate_runs(runs, subjects, jobs, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
