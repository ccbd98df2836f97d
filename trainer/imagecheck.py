"""Every training image checked before training starts, with the decoder the server uses.

``trainer fit`` reads the images in DataLoader workers, so a corrupt or wrong-size file used to
fail after minutes of training, deep in a worker traceback, and a truncated JPEG trained silently
(OpenCV fills the missing rows with grey). :func:`check_images` decodes every image once, in a
thread pool (libjpeg-turbo releases the GIL), with :mod:`engine.decode`: the size, the
decodability and the completeness of its data (strict libjpeg-turbo), and :func:`require_usable`
raises one error naming every bad file.

:func:`frame_size` finds the data's frame size from the image headers (the most common size),
so one odd image that sorts first is reported as the odd one out, not taken as the frame size.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.cli_util import progress_bar
from engine.decode import FrameRejected, declared_size, decode_encoded
from trainer.samples import IMAGE_SUFFIXES, IMAGES_DIR, MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class BadImage:
    """A training image that cannot be used, and why."""

    path: Path
    reason: str


def image_files(data_dir: Path) -> list[Path]:
    """The images of ``DATA/train_images`` that training reads, sorted."""
    folder = Path(data_dir) / IMAGES_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} has no {IMAGES_DIR}/ folder of images")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def check_image(path: Path, size: tuple[int, int] | None) -> BadImage | None:
    """None when ``path`` decodes completely (to ``size`` = (height, width) when given)."""
    try:
        decode_encoded(Path(path).read_bytes(), size, MAX_IMAGE_PIXELS)
    except FrameRejected as exc:
        return BadImage(Path(path), str(exc))
    except OSError as exc:
        return BadImage(Path(path), f"cannot be read ({exc.strerror or exc})")
    return None


def check_images(
    paths: Sequence[Path], size: tuple[int, int] | None, workers: int | None = None,
    on_checked: Callable[[int], None] | None = None,
) -> list[BadImage]:
    """Checks every image in parallel; returns the bad ones in ``paths`` order.

    Args:
        size: the frame size (height, width) every image must have; None checks decoding only.
        workers: threads (default: one per CPU core, at most 16).
        on_checked: called with 1 after each image (a progress bar's ``update``).
    """
    workers = workers or min(16, os.cpu_count() or 1)
    bad: list[BadImage | None] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="imagecheck") as pool:
        for result in pool.map(lambda p: check_image(p, size), paths):
            bad.append(result)
            if on_checked is not None:
                on_checked(1)
    return [b for b in bad if b is not None]


def require_usable(bad: Sequence[BadImage], checked: int, size: tuple[int, int] | None) -> None:
    """Raises one ValueError naming every bad image (nothing when there is none)."""
    if not bad:
        return
    expected = f" (frames must be {size[1]}x{size[0]}, width x height)" if size else ""
    lines = "\n".join(f"  {b.path}: {b.reason}" for b in bad)
    raise ValueError(
        f"{len(bad)} of {checked} training images are unusable{expected}; fix or remove them, "
        f"then run the same command again:\n{lines}"
    )


def frame_size(data_dir: Path) -> tuple[int, int]:
    """(height, width) most of ``DATA/train_images``' headers declare (ties: the first such image).

    Raises:
        FileNotFoundError: no images.
        ValueError: no image has a readable header.
    """
    images = image_files(data_dir)
    if not images:
        raise FileNotFoundError(f"data folder {data_dir} has no images to read the frame size from")
    sizes: Counter[tuple[int, int]] = Counter()
    for path in images:
        try:
            with open(path, "rb") as f:
                _, width, height = declared_size(f.read(64 * 1024))  # headers sit in the first bytes
        except (FrameRejected, OSError):
            continue  # reported, with its reason, by the full check
        sizes[(height, width)] += 1
    if not sizes:
        raise ValueError(f"no image in {data_dir} has a readable JPEG/PNG header to read the frame size from")
    return sizes.most_common(1)[0][0]


def check_training_images(data_dirs: Sequence[Path], size: tuple[int, int], progress: bool | None = False) -> int:
    """``trainer fit``'s check: every image of every data folder, one error naming all bad ones.

    ``progress``: a progress bar always (True), never (False) or only on a terminal (None).

    Returns:
        How many images were checked.
    """
    paths = [p for d in data_dirs for p in image_files(Path(d))]
    bar = progress_bar(total=len(paths), desc="checking training images", unit="image", leave=False, show=progress)
    try:
        bad = check_images(paths, size, on_checked=bar.update)
    finally:
        bar.close()
    require_usable(bad, len(paths), size)
    return len(paths)
