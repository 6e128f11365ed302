"""ImageFolder: a directory with one subfolder per class, its images (or videos) anywhere below it, hidden folders
and other files ignored (torchvision's `ImageFolder` layout)."""

from __future__ import annotations

import os
from pathlib import Path

from services.data.formats.base import DatasetFormat, Inside, ReadOptions
from services.data.formats.build import finish
from services.data.formats.columns import FilesBuilder, Labels
from services.data.formats.samples import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Dataset, DatasetError


def read_imagefolder(root: Path, inside: Inside | None = None, duplicates: str = "drop") -> Dataset:
    """One subfolder per class. With `inside`, every class folder and every linked file is checked by it. The files
    are gathered as a column (formats/columns.py: `Files`, each with the stat its fingerprint takes), so a million
    cost arrays, not a Path each."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; an ImageFolder dataset has one subfolder per class")
    files = FilesBuilder(str(root / "-")[:-1])  # what every path starts with ("" for "."): written once
    names = Labels()
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if inside is not None:
            inside(class_dir, f"class folder {class_dir}")
        # os.walk does not descend into linked folders below the class folder; linked files are checked one by one
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for f in sorted(filenames):
                if Path(f).suffix.lower() in MEDIA_SUFFIXES:
                    path = os.path.join(dirpath, f)  # what str(Path(dirpath) / f) is: dirpath is normalised
                    if inside is not None and os.path.islink(path):
                        inside(Path(path), f"file {path}")
                    files.add(path, os.stat(path))
                    names.append(class_dir.name)
    paths = files.build()
    return finish(root, paths, names, paths.where(), duplicates)


MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES


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
