"""Batch sampling to a directory (sample.py): prompt files (or class labels) in, PNGs with stable
names, a manifest and a grid out; a rerun makes only what is missing. A video DiT's clips are
written as an MP4 and an animated GIF each (`video_files`), the grid as a frame strip.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tqdm

from diffusion import rundir
from diffusion.inference import grids, video_files, wan_directory
from diffusion.inference.class2image import ClassToImage
from diffusion.inference.settings import (
    MAX_SEED,
    SamplerSettings,
    SamplingError,
    check_number,
    check_seed,
)
from diffusion.inference.text2image import TextToImage
from diffusion.inference.wan_pipeline import WanTextToVideo

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
GRID = "grid.png"
GRID_MAX_IMAGES = 256
GRID_MAX_CLIPS = 32  # rows of a frame strip
DEFAULT_FPS = 8.0  # frames per second of written clips
JSONL_FIELDS = ("prompt", "class", "negative_prompt", "seed", "guidance_scale")


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One image to make: the k-th sample (`index`) of the prompt (or class) on `line` of the
    prompt file (or at that position of a list of class labels)."""

    line: int  # 1-based line number in the prompt file
    index: int  # 0..num_per_prompt-1
    prompt: str  # "" for a class
    negative_prompt: str
    seed: int
    guidance_scale: float
    class_label: int | str | None = None  # a class-conditional run's class: id or name

    @property
    def stem(self) -> str:
        """Stable name: the same item always gets the same files, in any run."""
        return f"{self.line:05d}_{self.index:03d}"

    @property
    def file(self) -> str:
        """The item's image file (a clip's files: `clip_files`)."""
        return f"{self.stem}.png"


def clip_files(item: PromptItem) -> dict[str, str]:
    """The files of an item's clip: its MP4 (the manifest's "file") and its animated GIF."""
    return {"mp4": f"{item.stem}.mp4", "gif": f"{item.stem}.gif"}


def output_file(item: PromptItem, clips: bool) -> str:
    """The file the manifest names for an item: its PNG, or its clip's MP4."""
    return clip_files(item)["mp4"] if clips else item.file


def _is_written(output_dir: str, item: PromptItem, clips: bool) -> bool:
    names = clip_files(item).values() if clips else (item.file,)
    return all(os.path.isfile(os.path.join(output_dir, name)) for name in names)


def _jsonl_entry(text: str, where: str) -> dict:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise SamplingError(f"{where}: not valid JSON ({error.msg}): {text[:80]!r}") from error
    if not isinstance(entry, dict):
        raise SamplingError(f"{where}: expected a JSON object with a 'prompt', got {text[:80]!r}")
    unknown = sorted(set(entry) - set(JSONL_FIELDS))
    if unknown:
        raise SamplingError(f"{where}: unknown fields {unknown}; valid: {', '.join(JSONL_FIELDS)}")
    if "class" in entry:
        _check_class_entry(entry, where)
    elif not isinstance(entry.get("prompt"), str):
        raise SamplingError(f"{where}: 'prompt' must be a string, got {entry.get('prompt')!r}")
    negative = entry.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise SamplingError(f"{where}: 'negative_prompt' must be a string, got {negative!r}")
    if "seed" in entry:
        seed = entry["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
            raise SamplingError(f"{where}: 'seed' must be an integer in [0, 2**32), got {seed!r}")
    if "guidance_scale" in entry:
        scale = entry["guidance_scale"]
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)  # json reads NaN and Infinity
        ):
            raise SamplingError(f"{where}: 'guidance_scale' must be a finite number, got {scale!r}")
    return entry


def _check_class_entry(entry: dict, where: str) -> None:
    """A line of a class-conditional run: a class id or name, no prompt, no negative prompt."""
    label = entry["class"]
    if "prompt" in entry:
        raise SamplingError(f"{where}: give 'prompt' (a text-conditional run) or 'class', not both")
    if entry.get("negative_prompt"):
        raise SamplingError(
            f"{where}: a 'class' line takes no 'negative_prompt'; guidance pushes away from the "
            "null class"
        )
    is_id = isinstance(label, int) and not isinstance(label, bool) and label >= 0
    if not is_id and not (isinstance(label, str) and label.strip()):
        raise SamplingError(
            f"{where}: 'class' must be a class id (an integer >= 0) or a class name such as "
            f"'red circle', got {label!r}"
        )


def class_label_items(
    classes: Sequence[int | str],
    *,
    seed: int = 0,
    guidance_scale: float = 3.0,
    num_per_prompt: int = 1,
) -> list[PromptItem]:
    """The images a list of classes (ids or names; sample.py --class_labels) asks for: entry i
    is "line" i + 1, with seeds seed, seed + 1, ... for its `num_per_prompt` images."""
    check_seed(seed)
    check_number(guidance_scale, "guidance_scale")
    if seed + num_per_prompt > MAX_SEED:
        raise SamplingError("seeds past 2**32 - 1")
    if not classes:
        raise SamplingError("no class labels given; pass e.g. --class_labels=3,7 or 'red circle'")
    return [
        PromptItem(
            line=position + 1,
            index=k,
            prompt="",
            negative_prompt="",
            seed=seed + k,
            guidance_scale=float(guidance_scale),
            class_label=label,
        )
        for position, label in enumerate(classes)
        for k in range(num_per_prompt)
    ]


def _utf8_text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise SamplingError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); "
            "save the prompt file with UTF-8 encoding"
        ) from None


def read_prompt_file(
    path: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    guidance_scale: float = 3.0,
    num_per_prompt: int = 1,
) -> list[PromptItem]:
    """The images a prompt file asks for, in file order.

    `.jsonl`: one JSON object per line, {"prompt", "negative_prompt", "seed", "guidance_scale"}
    (all but prompt optional; the keyword arguments are the defaults), or for a class-conditional
    run {"class", "seed", "guidance_scale"} (class: an id or a name). Anything else: one prompt
    per line. Blank lines are skipped. Each prompt gives `num_per_prompt` images with seeds
    seed, seed + 1, ...
    """
    if (
        isinstance(num_per_prompt, bool)
        or not isinstance(num_per_prompt, int)
        or num_per_prompt < 1
    ):
        raise SamplingError(f"num_per_prompt must be an integer >= 1, got {num_per_prompt!r}")
    check_seed(seed)
    check_number(guidance_scale, "guidance_scale")
    if os.path.isdir(path):
        raise SamplingError(
            f"prompt file {path!r} is a directory; pass a .txt file (one prompt per line) or a "
            ".jsonl file"
        )
    if not os.path.isfile(path):
        raise SamplingError(f"prompt file {path!r} does not exist")
    is_jsonl = path.endswith(".jsonl")
    items = []
    with open(path, "rb") as f:
        content = _utf8_text(f.read(), path)
    with io.StringIO(content, newline=None) as f:  # newline=None: as open() splits lines
        for line_number, text in enumerate(f, start=1):
            text = text.strip()
            if not text:
                continue
            entry = _jsonl_entry(text, f"{path}:{line_number}") if is_jsonl else {"prompt": text}
            first_seed = entry.get("seed", seed)
            if first_seed + num_per_prompt > MAX_SEED:
                raise SamplingError(f"{path}:{line_number}: seeds past 2**32 - 1")
            is_class = "class" in entry
            for k in range(num_per_prompt):
                items.append(
                    PromptItem(
                        line=line_number,
                        index=k,
                        prompt="" if is_class else entry["prompt"],
                        negative_prompt=""
                        if is_class
                        else entry.get("negative_prompt") or negative_prompt or "",
                        seed=first_seed + k,
                        guidance_scale=float(entry.get("guidance_scale", guidance_scale)),
                        class_label=entry["class"] if is_class else None,
                    )
                )
    if not items:
        raise SamplingError(f"prompt file {path!r} has no prompts (only blank lines)")
    return items


def manifest_record(item: PromptItem, settings: SamplerSettings, pipeline) -> dict:
    """What the manifest says of one image: everything it is a function of, and its file (a
    class item: its class id and name in place of the prompt and negative prompt)."""
    if item.class_label is None:
        condition = {"prompt": item.prompt, "negative_prompt": item.negative_prompt}
    else:
        condition = {
            "class": item.class_label,
            "class_name": pipeline.classes.name(item.class_label),
        }
    clips = getattr(pipeline, "frames", 0) > 0
    files = {"file": output_file(item, clips)}
    if clips:
        files |= {"gif": clip_files(item)["gif"], "frames": pipeline.frames}
        if hasattr(
            pipeline, "frame_shape"
        ):  # a size chosen at sampling time (Wan): a new one redoes
            files |= dict(zip(("height", "width"), pipeline.frame_shape, strict=True))
    return {
        **files,
        "line": item.line,
        "index": item.index,
        **condition,
        "seed": item.seed,
        "guidance_scale": item.guidance_scale,
        "sampler": settings.name,
        "steps": settings.steps,
        "eta": settings.eta,
        "shift": settings.shift,
        "guidance_rescale": settings.guidance_rescale,
        "guidance_interval": None
        if settings.guidance_interval is None
        else list(settings.guidance_interval),
        "micro_batch": pipeline.micro_batch,
        "checkpoint": pipeline.run_dir,
        "checkpoint_step": pipeline.checkpoint_step,
        "use_ema": pipeline.use_ema,
    }


def read_manifest(output_dir: str) -> dict[str, dict]:
    """file -> record of an existing manifest (a record per file; the last one wins)."""
    path = os.path.join(output_dir, MANIFEST)
    records = {}
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                records[record["file"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s:%d is not a manifest record; ignoring it", path, number)
    return records


def _write_atomically(path: str, write) -> None:
    """write(temp_path), then rename onto `path`: a reader (or a kill) never sees half a file."""
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


def write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    _write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def write_manifest(output_dir: str, records: dict[str, dict]) -> None:
    """Rewrites the manifest from the records of finished files, sorted by file name."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for name in sorted(records):
                f.write(json.dumps(records[name], sort_keys=True) + "\n")

    _write_atomically(os.path.join(output_dir, MANIFEST), write)


def write_grid(
    output_dir: str,
    items: Sequence[PromptItem],
    path: str | None = None,
    tile: int = 64,
    clip_shape: tuple[int, int] | None = None,
    class_name=None,
) -> str | None:
    """The labelled grid of `items`' PNGs (OUTPUT_DIR/grid.png unless `path`): a row per prompt
    line (its prompt or class, named by `class_name(id)` where given, and any negative prompt on
    the left), a column per seed, gaps
    between them; the first GRID_MAX_IMAGES images that exist. Clips (`clip_shape`: their
    (height, width)): a frame strip, a row per clip (its frames left to right), of the first
    GRID_MAX_CLIPS. None when nothing exists yet."""
    from PIL import Image

    clips = clip_shape is not None
    shown = [i for i in items if _is_written(output_dir, i, clips)]
    shown = shown[: GRID_MAX_CLIPS if clips else GRID_MAX_IMAGES]
    if not shown:
        return None
    path = path or os.path.join(output_dir, GRID)
    label = lambda i: grids.row_label(i.prompt, i.negative_prompt, i.class_label, class_name)
    if clips:
        mp4 = lambda i: os.path.join(output_dir, clip_files(i)["mp4"])
        frames = np.stack([video_files.read_mp4(mp4(i), *clip_shape) for i in shown])
        return video_files.write_frame_strip(
            path, frames, [f"{label(i)} (seed {i.seed})" for i in shown], tile=tile
        )
    rows = []
    for line in dict.fromkeys(item.line for item in shown):  # the prompt file's order
        row = [item for item in shown if item.line == line]
        read = lambda i: np.asarray(Image.open(os.path.join(output_dir, i.file)).convert("RGB"))
        rows.append((label(row[0]), np.stack([read(i) for i in row])))
    return grids.save_labelled_rows(rows, path, tile=tile)


def _remove_stale_temporaries(output_dir: str) -> None:
    for name in os.listdir(output_dir):
        if name.startswith(".") and ".tmp-" in name:
            os.remove(os.path.join(output_dir, name))


def _agree_across_processes(mask: np.ndarray) -> np.ndarray:
    """Process 0's view of which items are pending, on every process (they must run together)."""
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(mask))


def load_pipeline(
    run_dir: str, *, use_ema: bool = True, text_encoder: str | None = None
) -> TextToImage | ClassToImage | WanTextToVideo:
    """The pipeline that samples a DiT run: TextToImage for a text-conditional DiT,
    ClassToImage for a class-conditional one (model.json says which); WanTextToVideo for a
    diffusers-format Wan 2.1 directory (its model_index.json names WanPipeline)."""
    if wan_directory.is_wan_directory(run_dir):
        if text_encoder:
            raise SamplingError(
                f"{run_dir!r} is a Wan 2.1 directory with its own umT5 text encoder; "
                "--text_encoder does not apply, leave it out"
            )
        return WanTextToVideo.from_diffusers(run_dir)
    location = rundir.locate_run(run_dir, what="DiT run")
    _, model_config = rundir.load_model_config(location.run_dir)
    if getattr(model_config, "conditioning", None) == "class":
        if text_encoder:
            raise SamplingError(
                f"{location.run_dir!r} is a class-conditional DiT: it reads no text encoder, "
                "so --text_encoder does not apply; leave it out"
            )
        return ClassToImage.from_run(run_dir, use_ema=use_ema)
    return TextToImage.from_run(run_dir, use_ema=use_ema, text_encoder=text_encoder)


def check_items(pipeline, items: Sequence[PromptItem]) -> list[PromptItem]:
    """Items that suit the pipeline: classes for ClassToImage (names resolved to ids), prompts
    for TextToImage; a mismatch is a SamplingError that says what to give instead."""
    is_class_run = isinstance(pipeline, ClassToImage)
    for item in items:
        if is_class_run and item.class_label is None:
            raise SamplingError(
                f"{pipeline.run_dir} is a class-conditional DiT ({pipeline.classes.describe()}): "
                "give classes (sample.py --class_labels=3,7, or JSONL lines "
                '{"class": 3} / {"class": "red circle"}), not prompts'
            )
        if not is_class_run and item.class_label is not None:
            raise SamplingError(
                f"{pipeline.run_dir} is a text-conditional DiT: give prompts (sample.py "
                f"--prompts=FILE), not class labels (got class {item.class_label!r})"
            )
    if not is_class_run:
        return list(items)
    ids = pipeline.class_ids([item.class_label for item in items])
    return [dataclasses.replace(i, class_label=c) for i, c in zip(items, ids, strict=True)]


def sample_to_directory(
    pipeline: TextToImage | ClassToImage,
    items: Sequence[PromptItem],
    output_dir: str,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    settings: SamplerSettings | None = None,
    stop: Callable[[], bool] | None = None,
    fps: float = DEFAULT_FPS,
    **sampler_options,
) -> dict[str, int]:
    """Makes the PNG of every item not already finished, with `manifest.jsonl` and `grid.png`
    (a video DiT's pipeline: the MP4 and GIF of each clip at `fps`, the grid a frame strip).

    Finished = its PNG exists and the manifest has its exact record (same prompt, seed and
    settings). Each batch's PNGs are renamed into place before the manifest (rewritten whole,
    atomically) lists them, so a kill at any moment loses at most the batch in flight and never
    leaves half a file or a duplicate line; a rerun redoes exactly the unfinished items, and the
    images are bit-identical to an uninterrupted run's (see the module docstring). With several
    processes, all run the program and process 0 writes. Returns {"generated", "skipped"}.
    settings / sampler_options: as in `TextToImage.generate`. Class items (`class_label`) need a
    ClassToImage, prompts a TextToImage (`check_items`). stop: called after each batch is
    written; True ends the job there (no grid; "stopped" in the result), as a rerun finishes it.
    """
    items = check_items(pipeline, items)
    if settings is None:
        settings = pipeline.settings(**sampler_options)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(output_dir, exist_ok=True)
        _remove_stale_temporaries(output_dir)
    records = read_manifest(output_dir) if os.path.isdir(output_dir) else {}
    clips = getattr(pipeline, "frames", 0) > 0
    if clips:
        fps = video_files.check_fps(fps)
    name = lambda item: output_file(item, clips)
    wanted = {name(item): manifest_record(item, settings, pipeline) for item in items}
    if len(wanted) != len(items):
        raise SamplingError("two prompt items map to the same file name; check the prompt file")
    pending_mask = np.array(
        [
            records.get(name(item)) != wanted[name(item)]
            or not _is_written(output_dir, item, clips)
            for item in items
        ],
        bool,
    )
    pending_mask = _agree_across_processes(pending_mask)
    pending = [item for item, todo in zip(items, pending_mask, strict=True) if todo]
    size = pipeline.program_batch_size(len(pending), batch_size)
    bar = tqdm.tqdm(
        total=len(pending),
        unit="clip" if clips else "img",
        desc="sample",
        disable=not progress or not writer,
        dynamic_ncols=True,
    )
    for start in range(0, len(pending), size):
        batch = pending[start : start + size]
        condition = (
            ([item.class_label for item in batch],)
            if isinstance(pipeline, ClassToImage)
            else ([item.prompt for item in batch], [item.negative_prompt for item in batch])
        )
        images = pipeline.generate(
            *condition,
            seeds=[item.seed for item in batch],
            guidance_scale=[item.guidance_scale for item in batch],
            batch_size=size,
            settings=settings,
        )
        if writer:
            for item, image in zip(batch, images, strict=True):
                if clips:
                    video_files.write_clip_files(output_dir, item.stem, image, fps)
                else:
                    write_png(os.path.join(output_dir, item.file), image)
            for item in batch:
                records[name(item)] = wanted[name(item)]
            write_manifest(output_dir, records)
        bar.update(len(batch))
        if stop is not None and stop() and start + size < len(pending):
            bar.close()
            done = start + len(batch)
            return {"generated": done, "skipped": len(items) - len(pending), "stopped": True}
    bar.close()
    if writer:
        if not pending and not os.path.isfile(os.path.join(output_dir, MANIFEST)):
            write_manifest(output_dir, records)
        # A Wan pipeline's frames need not be square (480 x 832); a DiT's always are.
        shape = (
            pipeline.frame_shape
            if hasattr(pipeline, "frame_shape")
            else (pipeline.image_size, pipeline.image_size)
        )
        clip_shape = shape if clips else None
        classes = getattr(pipeline, "classes", None)  # a class-conditional run's names
        class_name = classes.name if classes is not None else None
        write_grid(output_dir, items, clip_shape=clip_shape, class_name=class_name)
    return {"generated": len(pending), "skipped": len(items) - len(pending)}
