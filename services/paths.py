"""The one rule for every path a job spec names on the server (`dataset.path`, `dataset.test`, `backbone.checkpoint`,
and any path field to come), and for every file such a path links or lists (class folders, linked files, manifest
rows): links are followed first, then

- the service's own folders (`Settings.service_dirs`: the feature cache, models and checkpoints, Redis's files,
  logs; and in the uploads folder each upload and staging folder) are never data: a path that is one, lies in one,
  or holds one (the data dir itself, the uploads folder) is refused;
- the one exception is the caller's own upload, named by its id (`dataset.id`, `dataset.test_id`): the API puts its
  path in the spec after checking the owner, and then only that upload's folder is open to it;
- any other path must lie under an allowed root (`Settings.roots`); a `file://` URL is the path it names.

An object-store URL (`s3://bucket/shards/000000.tar`, a manifest's row `gs://...`) has the twin rule: it must lie
under an allowed prefix (`Settings.prefixes`, SIDETUNE_ALLOWED_PREFIXES; none by default, so no dataset is read from
an object store until an operator names where), and is refused outright if it carries credentials, a query or `.`/
`..` segments (services/data/formats/urls.py), the URL then unnamed in the message.

Refused paths raise `ForbiddenPath` (403 `forbidden_path`) naming the field, and nothing of what lies there: the
check runs before anything is read, so that no class, file or tensor name of another key's data, nor whether a file
exists there, can reach an error message. The API checks at submission, the workers again before they read (a stored
spec, or a folder that changed since, is checked as it is now). Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.data.formats.columns import Resolver
from services.data.formats.urls import is_remote, local_path, url_problem
from services.errors import UserError
from storage.datasets import is_dataset_id
from storage.settings import Settings


class ForbiddenPath(UserError, PermissionError):
    """A path the caller may not read; the message names the field and what to do instead."""

    code = "forbidden_path"
    status = 403

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class UserPaths:
    """The rule under one `Settings` (its folders resolved once, so a dataset's every file is checked cheaply)."""

    def __init__(self, settings: Settings) -> None:
        self.roots = settings.roots
        self.prefixes = settings.prefixes
        self.service = [d.resolve() for d in settings.service_dirs]
        self.uploads = settings.datasets_dir.resolve()
        # as text, for the checks of every file of a dataset: a million rows are a million checks
        self._roots, self._service, self._uploads = (
            [str(r) for r in self.roots],
            list(map(str, self.service)),
            str(self.uploads),
        )
        self._resolver = Resolver()
        self.archive_limits = settings.archive_limits  # what a dataset's archives (WebDataset shards) may hold

    def _is_service(self, real: str) -> bool:
        if any(_within(real, d) or _within(d, real) for d in self._service):
            return True
        if _within(self._uploads, real):  # the uploads folder, or a folder above it
            return True
        if _within(real, self._uploads):
            top = Path(real).relative_to(self._uploads).parts[0]
            return is_dataset_id(top) or top.startswith(".")
        return False

    def _refusal(self, real: str, upload: str | None) -> str | None:
        """Why `real` (resolved) may not be read, or None."""
        if upload is not None and is_dataset_id(upload) and _within(real, str(self.uploads / upload)):
            return None
        if self._is_service(real):
            return "service"
        if not any(_within(real, root) for root in self._roots):
            return "outside"
        return None

    def _advice(self, field: str) -> str:
        if field == "backbone.checkpoint":
            return "put the checkpoint file in a folder of its own under an allowed root"
        by_id = "dataset.test_id" if field == "dataset.test" else "dataset.id"
        return (
            f"put the dataset in a folder of its own under an allowed root (e.g. {self.roots[0] / 'mydata'}), or "
            f"upload it (POST /datasets) and name it by `{by_id}`"
        )

    def check(self, field: str, path: str | Path, upload: str | None = None) -> Path:
        """`path` resolved, if `field` may name it (`upload`: the id the spec names it by); ForbiddenPath if not,
        FileNotFoundError if it is allowed and missing."""
        if is_remote(str(path)):
            raise ForbiddenPath(f"{field}: an object-store URL where a file on the server is needed", field)
        real = Path(local_path(str(path))).expanduser().resolve()
        why = self._refusal(str(real), upload)
        if why == "service":
            raise ForbiddenPath(
                f"{field}: {str(path)!r} is, holds or lies in one of the service's own folders "
                "(uploaded datasets, the feature cache, models and checkpoints, logs, Redis's files), "
                f"which are never read as data; {self._advice(field)}",
                field,
            )
        if why == "outside":
            allowed = ", ".join(str(r) for r in self.roots)
            raise ForbiddenPath(
                f"{field}: {str(path)!r} is outside the allowed roots ({allowed}); {self._advice(field)}", field
            )
        if not real.exists():
            raise FileNotFoundError(f"{field}: {str(path)!r} does not exist")
        return real

    def check_url(self, field: str, url: str, what: str | None = None) -> str:
        """`url` (an object in a store), if it lies under an allowed prefix; ForbiddenPath if not, or if it carries
        credentials, a query or `.`/`..` segments (then not repeated). `what` names it inside the dataset (a row)."""
        where = f"{field}: {what}" if what else field
        problem = url_problem(url)
        if problem is not None:
            raise ForbiddenPath(f"{where}: {problem}", field)
        scheme, _, rest = url.partition("://")
        normal = f"{scheme.lower()}://{rest}"
        if not any(normal.startswith(prefix) for prefix in self.prefixes):
            allowed = ", ".join(self.prefixes) or "none are set (SIDETUNE_ALLOWED_PREFIXES)"
            raise ForbiddenPath(
                f"{where}: {url!r} is outside the allowed object-store prefixes ({allowed}); put the data under one "
                "of them, or ask the operator to allow its prefix",
                field,
            )
        return normal

    def check_location(self, field: str, location: str, upload: str | None = None) -> Path | str:
        """A location of the dataset at `field`: an object URL under the prefix rule, else a path under the roots
        rule (`check`)."""
        return self.check_url(field, location) if is_remote(location) else self.check(field, location, upload)

    def checkpoint(self, backbone: Any) -> Path | None:
        """A backbone spec's `checkpoint` file resolved under the rule, or None without one."""
        return self.check("backbone.checkpoint", backbone.checkpoint) if backbone.checkpoint else None

    def check_member(self, field: str, path: Path | str, what: str, upload: str | None = None) -> None:
        """A file or folder of the dataset at `field` (`what` names it: a class folder, a file, a manifest row),
        links followed: refused if it reaches a service folder (the target then goes unnamed) or leaves the roots;
        an object URL (a manifest's row, a shard) by the prefix rule."""
        if is_remote(str(path)):
            self.check_url(field, str(path), what)
            return
        real, _ = self._resolver.resolve(local_path(str(path)))  # each folder resolved once
        why = self._refusal(real, upload)
        if why == "service":
            raise ForbiddenPath(
                f"{field}: {what} lies in (or links into) one of the service's own folders, which "
                f"are never read as data; {self._advice(field)}",
                field,
            )
        if why == "outside":
            allowed = ", ".join(str(r) for r in self.roots)
            raise ForbiddenPath(f"{field}: {what} resolves to {real}, outside the allowed roots ({allowed})", field)


def _within(path: str, folder: str) -> bool:
    """`Path(path).is_relative_to(folder)`, of two resolved paths as text."""
    return path == folder or path.startswith(folder if folder.endswith("/") else folder + "/")
