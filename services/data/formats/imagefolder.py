"""ImageFolder: a directory with one subfolder per class, its images (or videos) anywhere below it, hidden folders
and other files ignored (torchvision's `ImageFolder` layout)."""

from __future__ import annotations

import os
from pathlib import Path

from services.data.formats.base import DatasetFormat, Inside, ReadOptions
from services.data.formats.build import finish
from services.data.formats.samples import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Dataset, DatasetError, Item


def read_imagefolder(root: Path, inside: Inside | None = None, duplicates: str = "drop") -> Dataset:
    """One subfolder per class. With `inside`, every class folder and every linked file is checked by it."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; an ImageFolder dataset has one subfolder per class")
    paths: list[Item] = []
    names: list[str] = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if inside is not None:
            inside(class_dir, f"class folder {class_dir}")
        # os.walk does not descend into linked folders below the class folder; linked files are checked one by one
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for f in sorted(filenames):
                if Path(f).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                    path = Path(dirpath) / f
                    if inside is not None and path.is_symlink():
                        inside(path, f"file {path}")
                    paths.append(path)
                    names.append(class_dir.name)
    return finish(root, paths, names, [str(p) for p in paths], duplicates)


class ImageFolder(DatasetFormat):
    name = "imagefolder"

    def claims(self, location: str) -> bool:
        return True  # asked last: what no other format claims is read as a folder

    def read(self, location: str, files: list[Path | str], options: ReadOptions, inside: Inside | None) -> Dataset:
        (root,) = files
        if isinstance(root, str):  # an object-store URL: listing a bucket's folders is no way to read a dataset
            raise DatasetError(
                f"{root}: an ImageFolder is read from the server's disk; in an object store, name WebDataset shards "
                "(`.tar`, a brace pattern) or a manifest (`.csv`, `.jsonl`) whose rows are URLs"
            )
        if options.multi_label:
            raise DatasetError(
                f"{root}: multi-label datasets are CSV manifests or WebDataset shards whose labels hold several "
                "tags; an ImageFolder has one class per image"
            )
        return read_imagefolder(root, inside, options.duplicates)
