"""The Hugging Face datasets that `datasets.load_dataset` itself builds, as (split, its Arrow files): a Hub id
(`hf://org/name`, at a `revision` and a `config` name where the spec gives them), and an `imagefolder` with metadata
(https://huggingface.co/docs/datasets/image_dataset#imagefolder): a folder of images, possibly in split folders
(`train/`, `validation/`, `test/`, and the other names the library takes for them), and a `metadata.csv` or
`metadata.jsonl` (or `metadata.parquet`) whose `file_name` column names each image relative to the metadata file and
whose other columns are its labels.

The library's own convention decides which files and splits there are, so a folder reads here as it reads with
`load_dataset("imagefolder", data_dir=...)`. For an imagefolder the Arrow files it writes into the server's Hugging
Face cache hold each image's path, not its bytes (formats/huggingface.py reads each from its file, under the paths
rule), and its metadata files are checked by the rule before the library reads them.

The `datasets` library is the `hf` extra, imported here only when such a dataset is read. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from services.data.formats.base import HuggingFaceOptions, Inside
from services.data.formats.samples import DatasetError

HUB = "hf://"
EXTRA = "install the `hf` extra on the server: pip install 'sidetune[hf]'"
# the names `datasets`' folder builders take for the metadata files (FolderBasedBuilder.METADATA_FILENAMES)
METADATA = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
_YES = ("1", "true", "yes", "on")

Splits = list[tuple[str, list[Path]]]


def library() -> Any:
    """The `datasets` module; DatasetError naming the extra where it is not installed."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"Hugging Face datasets are read with the `datasets` library, not installed here; {EXTRA}"
        ) from None
    return datasets


def metadata_files(root: Path) -> list[Path]:
    """The metadata files of an imagefolder at `root`: at its top or in a folder just below (a split's). Not deeper,
    so that telling a folder's format does not list a large ImageFolder."""
    if not root.is_dir():
        return []
    found = [root / name for name in METADATA if (root / name).is_file()]
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        found.extend(sub / name for name in METADATA if (sub / name).is_file())
    return found


def _parts(loaded: Any) -> Splits:
    """(split, its Arrow files) of what `load_dataset` returned: a DatasetDict, or one Dataset (`train`)."""
    datasets = library()
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("train", loaded)]
    return [(str(split), [Path(c["filename"]) for c in ds.cache_files]) for split, ds in parts]


def _line(text: str, limit: int = 300) -> str:
    """An error's text on one line, cut to `limit` characters."""
    return " ".join(text.split())[:limit]


def load_folder(root: Path, inside: Inside | None) -> Splits:
    """(split, its Arrow files) of the imagefolder with metadata at `root`, built by the library; its metadata files
    checked by `inside` first. DatasetError saying why the library refused it (a `file_name` outside the folder, no
    `file_name` column, metadata files that disagree)."""
    datasets = library()
    if inside is not None:
        for file in metadata_files(root):
            inside(file, f"metadata file {file.relative_to(root)}")
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(root))
    except Exception as e:  # the library's builder raises ValueError, its own errors, pandas' and pyarrow's
        raise DatasetError(
            f"{root}: the imagefolder's metadata cannot be read by the `datasets` library ({type(e).__name__}: "
            f"{_line(str(e))}); each metadata file needs a `file_name` column naming an image relative to it"
        ) from None
    return _parts(loaded)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in _YES for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _has_token() -> bool:
    """Whether the server has a Hugging Face token (HF_TOKEN, or a saved login); the token itself is never read
    into a message."""
    from huggingface_hub import get_token

    return get_token() is not None


def _gated(e: BaseException) -> bool:
    """Whether the library refused a gated dataset: huggingface_hub's GatedRepoError, which `load_dataset` turns into
    a DatasetNotFoundError saying so (and re-raises without its cause)."""
    from huggingface_hub.errors import GatedRepoError

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, GatedRepoError) or "is a gated dataset" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _why(name: str, e: Exception) -> str:
    """Why the Hub dataset `name` could not be loaded, in words."""
    page = f"https://huggingface.co/datasets/{name}"
    if _gated(e) and not _has_token():
        return (
            "it is a gated dataset and the server has no Hugging Face token: set HF_TOKEN in the workers' "
            f"environment to a token of an account granted access on {page}"
        )
    if _gated(e):
        return f"it is a gated dataset and the server's token has no access to it: ask for access on {page}"
    cause = "the server is offline (HF_HUB_OFFLINE is set) and has no cached copy" if _offline() else type(e).__name__
    return f"{cause}: {_line(str(e))}"


def load_hub(location: str, options: HuggingFaceOptions) -> Splits:
    """(split, its Arrow files) of a Hub dataset at `options.revision` and `options.config` (the library's defaults
    where None), downloaded (or found in the cache); DatasetError saying why not, on one line (a gated dataset:
    whether the server has a token at all)."""
    datasets = library()
    name = location[len(HUB) :].strip("/")
    asked = [
        f"{what} {value!r}" for what, value in (("config", options.config), ("revision", options.revision)) if value
    ]
    at = f" ({', '.join(asked)})" if asked else ""
    try:
        loaded = datasets.load_dataset(name, options.config, revision=options.revision)
    except Exception as e:  # the library raises many kinds (connection, not found, offline, auth)
        raise DatasetError(
            f"{location}: the Hugging Face Hub dataset {name!r}{at} cannot be loaded on this server ({_why(name, e)}); "
            "save it with `save_to_disk` (or its Parquet files) under an allowed root and name that folder instead"
        ) from None
    return _parts(loaded)
