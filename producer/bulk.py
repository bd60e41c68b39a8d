"""`svdq bulk SRC --out DIR`: a folder or a manifest of images in, a folder of videos out, resumable.

1. Read the inputs from a folder (images found recursively) or a `.csv`/`.jsonl` manifest, and check every
   row before anything is submitted: all the problems are reported at once, with their line numbers.
2. Key each input by its image's content, its effective parameters and its seed. The key is the job's
   idempotency key, so re-running the same command finds the jobs it submitted before: it submits nothing
   new, follows them, and downloads only the videos that are missing. Identical inputs share one job.
3. Submit what is new (`Client.submit_many`), follow every job, write each video atomically as it ends.
4. `DIR/svdq-bulk.jsonl` gets one line per input as it ends: the run's report, which survives a crash.

A manifest's every value is untrusted: its images are read from inside one folder (--images-root, by default
the manifest's own), its references pass the checks a submit applies, and its outputs are written inside --out
through no link, whatever links are planted there before or during the run.

Without a seed, an input's seed derives from its content hash: a re-run renders the same video.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import secrets
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import redis

from producer.client import Client, Intake, Job, NotCancelable, Submission
from producer.contract import (
    InvalidParameter,
    JobParams,
    JobRecord,
    JobState,
    has_control,
    printable,
    renamed,
    shown,
    value_from_text,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
URL_PREFIXES = ("http://", "https://", "s3://")
REPORT = "svdq-bulk.jsonl"
READ_BATCH = 2000  # whole records read at once, for the lines of inputs that have not ended
NAME_MAX = 255  # bytes in one name: what Linux's file systems hold
# An output's bytes, relative to --out: deeper than any layout anyone mirrors, and far from PATH_MAX (4,096) with
# --out's own path in front of it.
MAX_OUTPUT = 1024
_NOT_PARAMS = {"image", "output"}  # a manifest's columns that are not render parameters
# A manifest column -> the parameter it sets: the contract's names, and the CLI's flags without their dashes.
COLUMNS = {name: name for name in JobParams.model_fields} | {
    "frames": "num_frames",
    "steps": "num_inference_steps",
    "min_guidance": "min_guidance_scale",
    "max_guidance": "max_guidance_scale",
}


class ManifestError(ValueError):
    """Every problem found in the inputs, one line each ("line 3: num_frames: must be ...").

    `items`, where set, are the rows read despite a problem no row can be rendered with (an unknown column): `plan`
    them for their own problems, so that one look at the manifest shows all of them."""

    def __init__(self, problems: list[str], items: list[Item] | None = None):
        self.problems, self.items = problems, items
        super().__init__(f"{len(problems)} problem(s) in the inputs:\n  " + "\n  ".join(problems))


class OutUnusable(ValueError):
    """--out cannot hold this run's report: said before anything is submitted."""


class Item:
    """One input: where its image is, where its video goes (relative to --out), its own parameters.

    Kept small (slots, strings rather than paths and models): a run holds one per input, 100,000 of them for a
    big manifest, for as long as it follows their jobs."""

    __slots__ = (
        "_image",
        "_local",
        "_output",
        "digest",
        "key",
        "line",
        "noted",
        "params",
        "problem",
        "seed",
        "source",
        "spec",
    )

    def __init__(
        self,
        source: str,
        image: Path | str,
        output: PurePosixPath,
        params: dict[str, Any] | None = None,
        line: int | None = None,
        problem: str | None = None,
    ):
        self.source = source  # as the user knows it: a path relative to SRC, or a URL
        self._image, self._local = str(image), isinstance(image, Path)  # a local file, or a URL the worker reads
        self._output = str(output)
        self.params = params or {}
        self.line = line
        # Filled in by `plan`: the effective parameters (as JSON), the seed, the job's idempotency key.
        self.spec: str | None = None
        self.seed: int | None = None
        self.key = ""
        self.digest: bytes | None = None  # a local image's SHA-256 as `plan` read it: what is submitted must match
        self.problem = problem  # a bad row skipped under --skip-invalid, or an unreadable image
        # A row's problem found on reading that leaves the rest of it to check (an unknown field): `plan` adds
        # what else is wrong with it, so that one report says all of it.
        self.noted: str | None = None

    @property
    def image(self) -> Path | str:
        return Path(self._image) if self._local else self._image

    @property
    def output(self) -> PurePosixPath:
        return PurePosixPath(self._output)

    @output.setter
    def output(self, value: PurePosixPath) -> None:
        self._output = str(value)

    @property
    def effective(self) -> JobParams | None:
        return None if self.spec is None else JobParams.model_validate({**json.loads(self.spec), "seed": self.seed})

    def submission(self, key: str | None = None) -> Submission:
        assert self.spec is not None, "plan() first"
        params = {k: v for k, v in json.loads(self.spec).items() if v is not None}
        image = self.image
        if isinstance(image, Path) and self.digest is not None:
            image = AsChecked(image, self.digest, self.source)  # type: ignore[assignment]
        return Submission(image, {**params, "seed": self.seed}, key or self.key)


class AsChecked:
    """A local image, read at submit only if it still is the file `plan` checked and hashed.

    Between the two, a link swapped in (for the file or a folder above it) could lead outside the images' root,
    and new bytes would not be what the job's key says it renders. Either way the bytes differ: that line fails
    and the rest goes on."""

    def __init__(self, path: Path, digest: bytes, source: str):
        self.path, self.digest, self.source = path, digest, source

    def read(self, limit: int) -> bytes:
        try:
            # Non-blocking: a FIFO swapped in would hold open() (and the whole run) until someone wrote to it.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidParameter("image", f"cannot read {shown(self.source)}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidParameter("image", f"{shown(self.source)} is no longer a file: run the command again")
            data = f.read(limit)
        if hashlib.sha256(data).digest() != self.digest:
            raise InvalidParameter("image", f"{shown(self.source)} changed since it was checked: run the command again")
        return data


# 1. Reading the inputs.


def read_inputs(src: Path, images_root: Path | None = None) -> list[Item]:
    """The inputs named by SRC: a folder's images (sorted, recursively) or a manifest's rows. Every image must
    resolve, links followed, inside `images_root`: by default SRC itself, or a manifest's own folder."""
    root = (images_root or (src if src.is_dir() else src.parent)).resolve()
    if src.is_dir():
        return _folder(src, root)
    try:
        if src.suffix.lower() == ".csv":
            with src.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows = ((n, row) for n, row in enumerate(reader, start=2))
                return _rows(src, root, rows, reader.fieldnames or [], text=True)
        if src.suffix.lower() == ".jsonl":
            return _rows(src, root, _jsonl(src), None, text=False)
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{src}: not UTF-8 text (byte {exc.start} of a line cannot be read)"]) from None
    except csv.Error as exc:  # a cell over csv's field size limit, a NUL...
        raise ManifestError([f"{src}: not a CSV file svdq can read ({exc})"]) from None
    except OSError as exc:
        raise ManifestError([f"{src}: cannot read it ({exc.strerror or exc})"]) from None
    if src.exists():
        raise ManifestError([f"{src}: not a folder, a .csv or a .jsonl manifest"])
    raise ManifestError([f"{src}: no such file or folder"])


def _outside(image: str, root: Path) -> str:
    where = "where images are read from (--images-root DIR names another)"
    return f"image: {shown(image, 200)} leads outside {root}, {where}"


def _folder(src: Path, root: Path) -> list[Item]:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems = Counter(p.with_suffix("") for p in files)
    items = []
    for path in files:
        rel = PurePosixPath(path.relative_to(src).as_posix())
        # cat.png -> cat.mp4, unless cat.jpg sits beside it: then cat.png.mp4 and cat.jpg.mp4
        output = rel.with_suffix("") if stems[path.with_suffix("")] == 1 else rel
        real = path.resolve()  # what is read is what was checked, not a link that may lead elsewhere later
        problem = None if real.is_relative_to(root) else _outside(str(rel), root)  # a link to a file outside
        items.append(Item(source=str(rel), image=real, output=output, problem=problem))
    return items


def _jsonl(src: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with src.open(encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                row = {"__error__": f"not JSON ({exc.msg})"}
            except RecursionError:
                row = {"__error__": "not JSON svdq reads (nested too deeply)"}
            yield n, row if isinstance(row, dict) else {"__error__": "not a JSON object"}


def _rows(
    src: Path, root: Path, rows: Iterator[tuple[int, dict[str, Any]]], header: list[str] | None, text: bool
) -> list[Item]:
    """A bad row becomes an Item with its `problem` set: all of them are reported together, or skipped. A header
    with an unknown column is a ManifestError carrying the rows (each row's cell under it said once, on line 1)."""
    unknown = list(dict.fromkeys(c for c in header or () if c not in COLUMNS and c not in _NOT_PARAMS))
    if header is not None and "image" not in header:  # no row names an image: their problems would be this one
        raise ManifestError([f"line 1: unknown column {c!r}" for c in unknown] + ["line 1: no 'image' column"])
    items = []
    for n, row in rows:
        try:
            items.append(_row(src, root, n, {c: v for c, v in row.items() if c not in unknown}, text))
        except ValueError as exc:
            name = str(row.get("image") or f"line {n}")
            items.append(Item(name, name, PurePosixPath(f"line-{n}"), line=n, problem=str(exc)))
    if unknown:
        raise ManifestError([f"line 1: unknown column {c!r}" for c in unknown], items)
    return items


def _row(src: Path, root: Path, n: int, row: dict[str, Any], text: bool) -> Item:
    """The row's Item; a ValueError says everything found wrong with it, where that leaves no Item to plan."""
    if "__error__" in row:
        raise ValueError(row["__error__"])
    noted = [
        f"unknown field {shown(c, 66)}" for c in row if c is not None and c not in COLUMNS and c not in _NOT_PARAMS
    ]
    if None in row:  # csv's key for the cells past the header's last column
        noted.append(f"{len(row[None])} cell(s) past the header's last column")
    given: dict[str, str] = {}  # parameter -> the first column to set it
    for column, value in row.items():
        if (
            column in COLUMNS
            and value not in (None, "")
            and (other := given.setdefault(COLUMNS[column], column)) != column
        ):
            noted.append(f"{other} and {column} both set {COLUMNS[column]}: give one")
    known = {c: v for c, v in row.items() if c in COLUMNS or c in _NOT_PARAMS}
    try:
        item = _row_item(src, root, n, known, text)
    except ValueError as exc:
        raise ValueError("; ".join([*noted, str(exc)])) from None
    item.noted = "; ".join(noted) or None
    return item


def _row_item(src: Path, root: Path, n: int, row: dict[str, Any], text: bool) -> Item:
    image = str(row.get("image") or "").strip()
    if not image:
        raise ValueError("image: empty")
    if has_control(image):  # a NUL is a traceback in the file system's calls; none names a file or URL
        raise ValueError(f"image: {shown(image)} holds control characters")
    params = {  # by the column's name, which a problem with its value names: the row's words, not the contract's
        column: value_from_text(value) if text else value
        for column, value in row.items()
        if column not in _NOT_PARAMS and value not in (None, "")
    }
    if image.startswith(URL_PREFIXES):
        source: Path | str = image
        default_output = PurePosixPath(PurePosixPath(image.split("?", 1)[0]).name or f"line-{n}").with_suffix("")
    else:
        source, default_output = _local_image(src, root, image)
    output = PurePosixPath(str(row["output"])) if row.get("output") else default_output
    if output.is_absolute() or ".." in output.parts or not output.parts:
        raise ValueError(f"output: must be a relative path inside --out (got {str(output)!r})")
    return Item(source=image, image=source, output=output, params=params, line=n)


def _local_image(src: Path, root: Path, image: str) -> tuple[Path, PurePosixPath]:
    """A row's image file, resolved (the file read is the one checked), and its default output."""
    try:
        path = (src.parent / image).resolve()
        # Before asking whether it exists: a manifest must not learn which files outside the root do.
        if not path.is_relative_to(root):
            raise ValueError(_outside(image, root))
        found = path.is_file()
    except (OSError, UnicodeError) as exc:  # a name too long for the file system, one it cannot encode...
        raise ValueError(f"image: cannot read {shown(image)}: {getattr(exc, 'strerror', None) or exc}") from None
    if not found:
        raise ValueError(f"image: no such file: {image}")
    typed = PurePosixPath(Path(image).as_posix())
    # An image from above the manifest's folder (--images-root): its place under the root, not "../x".
    if typed.is_absolute() or ".." in typed.parts:
        typed = PurePosixPath(path.relative_to(root).as_posix())
    return path, typed.with_suffix("")


# 2. Keys, seeds and checks.


def content_hash(item: Item) -> str:
    """The image's SHA-256, read a chunk at a time: a cap of gigabytes must not mean gigabytes in memory. A URL's
    is its text's."""
    if not isinstance(item.image, Path):
        return hashlib.sha256(item.image.encode()).hexdigest()
    with item.image.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def plan(items: list[Item], defaults: dict[str, Any], intake: Intake) -> list[str]:
    """Effective parameters, seed, output suffix and key for each input (its row's own parameters are merged in
    and dropped), each checked as a submit would check it; returns every problem found, by line."""
    outputs = Outputs()
    specs: dict[str, str] = {}
    digests: dict[bytes, bytes] = {}
    for item in items:
        if item.problem is None:
            found = _plan_one(item, defaults, intake, specs, digests)
            # A row with a noted problem is not rendered: it claims no output from a row that will be.
            found = found or (None if item.noted else outputs.claim(item))
            item.problem = "; ".join(p for p in (item.noted, found) if p) or None
    return [f"{f'line {i.line}' if i.line else i.source}: {i.problem}" for i in items if i.problem is not None]


def _plan_one(
    item: Item, defaults: dict[str, Any], intake: Intake, specs: dict[str, str], digests: dict[bytes, bytes]
) -> str | None:
    """Plans one input; returns its problem, if any."""
    try:
        digest = _digest(item, intake.settings.max_image_bytes)
        merged = {**defaults, **{COLUMNS[column]: value for column, value in item.params.items()}}
        merged.setdefault("seed", int(digest[:8], 16))  # the same image renders the same video on a re-run
        if isinstance(item.image, Path):
            item.digest = digests.setdefault(raw := bytes.fromhex(digest), raw)  # one object for one image's rows
            effective = intake.check_request(merged, "normal")[0]  # its content is checked at submit, read once
        else:
            # A submit's checks of a reference, here so that a refusal is one more problem found before anything
            # is submitted: the URL's address (a metadata service...), the buckets and folders the store reads.
            checked = intake.check(item.image, priority="normal", idempotency_key=None, webhook=None, params=merged)
            effective = checked.params
    except InvalidParameter as exc:
        words = {COLUMNS[column]: column for column in item.params}  # the row's names for what it set (last wins)
        return f"{words.get(exc.param, exc.param)}: {renamed(exc.message, words)}"
    if item.output.suffix != f".{effective.format}":
        item.output = item.output.with_name(f"{item.output.name}.{effective.format}")
    if problem := output_problem(item.output):
        return problem
    # Rows mostly differ by their seed alone: one shared string for the rest (a run holds one per input).
    spec = json.dumps(effective.model_dump(exclude={"seed"}), sort_keys=True)
    item.spec, item.seed, item.params = specs.setdefault(spec, spec), effective.seed, {}
    canonical = json.dumps({"image": digest, "params": effective.model_dump()}, sort_keys=True)
    item.key = "bulk-" + hashlib.sha256(canonical.encode()).hexdigest()
    return None


def _digest(item: Item, limit: int) -> str:
    """The image's content hash; a file over SVDQ_MAX_IMAGE_BYTES is refused from its size, unread."""
    if not isinstance(item.image, Path):
        return content_hash(item)
    try:
        if item.image.stat().st_size > limit:
            raise InvalidParameter("image", f"larger than SVDQ_MAX_IMAGE_BYTES={limit}")
        return content_hash(item)
    except OSError as exc:  # gone or unreadable since it was listed
        raise InvalidParameter("image", f"cannot read {shown(item.source)}: {exc.strerror or exc}") from None


def output_problem(output: PurePosixPath) -> str | None:
    """What the file system would refuse of an output (relative to --out, suffix included): found before anything
    is submitted, not as a traceback once its video has rendered."""
    text = str(output)
    if has_control(text):
        return f"output: {shown(text)} holds control characters"
    try:
        names = [os.fsencode(name) for name in output.parts]
    except UnicodeError:  # a lone surrogate from a JSON escape
        return f"output: {shown(text)} is not a name a file system holds"
    if output.parts[0] == REPORT:
        return f"output: {REPORT} is the run's report"
    if too_long := next((name for name in names if len(name) > NAME_MAX), None):
        return f"output: a name in {shown(text)} is {len(too_long)} bytes long, over {NAME_MAX}"
    if (size := len(os.fsencode(text))) > MAX_OUTPUT:
        return f"output: {shown(text)} is {size:,} bytes long, over {MAX_OUTPUT:,}"
    return None


class Outputs:
    """The files a run writes and the folders they go in: two inputs share a file only as one job (identical
    inputs), and no input's file is another's folder (`a.mp4` and `a.mp4/b.mp4`: one of them cannot be written)."""

    def __init__(self) -> None:
        self.files: dict[PurePosixPath, Item] = {}
        self.folders: dict[PurePosixPath, Item] = {}  # each folder an output needs -> the first input needing it

    def claim(self, item: Item) -> str | None:
        """Records `item`'s output; returns the problem if it cannot be written beside those claimed before."""
        output, folders = item.output, item.output.parents[:-1]  # the last parent is "." (--out itself)
        if (other := self.files.get(output)) is not None and other.key != item.key:  # two videos for one file
            return f"output: {output} is also the output of {other.source} (give each row its own)"
        if (other := self.folders.get(output)) is not None:
            return f"output: {output} is also a folder, for the output of {other.source} (give each row its own)"
        for folder in folders:
            if (other := self.files.get(folder)) is not None:
                return f"output: {folder} is the output of {other.source}, so it cannot be a folder too"
        self.files.setdefault(output, item)
        for folder in folders:
            self.folders.setdefault(folder, item)
        return None


def retry_key(key: str, failed_job: str) -> str:
    """The key of the resubmission of a failed job: re-runs with --retry-failed find it again."""
    return f"{key[:64]}-retry-{failed_job}"


# 3. Submitting, following, downloading.


UNSUBMITTED = "unsubmitted"  # a report's state for an input the run never submitted (Redis went away, Ctrl-C)


@dataclass(slots=True)
class Outcome:
    item: Item
    job: Job | None = None
    record: JobRecord | None = None  # read once the job has ended (or been canceled), until the input ends
    seen: JobState | None = None  # the state at the latest poll while it runs
    error: dict[str, str] | None = None
    new: bool = False
    downloaded: bool = False
    final: str | None = None  # the state it ended in (its record is dropped then: a run holds many)
    frames: int = 0

    @property
    def state(self) -> str:
        if self.final is not None:
            return self.final
        if self.error is not None:  # refused before a job, or its video could not be written where asked
            return JobState.FAILED.value
        if self.job is None:  # the run stopped before it was submitted
            return UNSUBMITTED
        if self.record is not None:
            return self.record.state.value
        return (self.seen or JobState.QUEUED).value

    def line(self, out: Path) -> dict[str, Any]:
        record = self.record
        error = self.error or (record.error.model_dump() if record and record.error else None)
        seed = record.result.seed if record and record.result else self.item.seed
        return {
            "input": self.item.source,
            "job_id": self.job.id if self.job else None,
            "state": self.state,
            "output": str(out / self.item.output) if self.state == JobState.SUCCEEDED.value else None,
            "error": error,
            "seed": seed,
            "timings": record.timings if record else {},
        }


def open_folder(out: Path, folder: PurePosixPath) -> int:
    """A descriptor of `folder` under --out, made if missing, reached through no link: a link there, planted
    before the run or swapped in during it, could lead anywhere. --out itself is the user's, links and all."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in folder.parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_whole(folder: int, name: str, size: int) -> bool:
    """Whether `name` in `folder` is already a file of `size` bytes (not a link to one)."""
    try:
        found = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(found.st_mode) and found.st_size == size


def write_atomically(folder: int, name: str, data: bytes) -> None:
    """The whole file or none of it, even across a crash: a partial file next to it, synced, then renamed.
    The partial file's name is drawn at random and must be new (O_EXCL): a link planted at a name known in
    advance would have the video written wherever it led, then put in place as the output."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        partial = f".svdq-{secrets.token_hex(8)}.part"  # short: `name` may already be all a name can hold
        with contextlib.suppress(FileExistsError):
            fd = os.open(partial, flags, 0o666, dir_fd=folder)
            break
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, name, src_dir_fd=folder, dst_dir_fd=folder)  # over a link, not through it
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=folder)


def unwritable(output: PurePosixPath, out: Path, exc: OSError) -> dict[str, str]:
    """A report's error for a video that cannot be written where asked, saying why in the user's words."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # O_NOFOLLOW met a link (or a file stands where a folder goes)
        why = "a folder on its way is a link or a file; svdq writes only inside --out, through no link"
    else:
        why = exc.strerror or str(exc)
    return {"code": "output_unwritable", "message": f"cannot write {out / output}: {why}"}


def link_in(out: Path, output: PurePosixPath) -> PurePosixPath | None:
    """The first part of `output` under --out that is a link now, if any: no video is written through one."""
    path = out
    for n, name in enumerate(output.parts, start=1):
        path = path / name
        try:
            mode = os.lstat(path).st_mode
        except OSError:  # not there yet (made when its video is written), or not reachable: said then
            return None
        if stat.S_ISLNK(mode):
            return PurePosixPath(*output.parts[:n])
    return None


class Run:
    """One `svdq bulk` run over planned items: submit, follow, download, report."""

    def __init__(
        self,
        client: Client,
        items: list[Item],
        out: Path,
        *,
        priority: str,
        retry_failed: bool,
        on_end: Callable[[Outcome, dict[str, Any]], None] = lambda outcome, line: None,
        on_poll: Callable[[Counter[str]], None] = lambda waiting: None,
    ):
        self.client, self.items, self.out = client, items, out
        self.priority, self.retry_failed, self.on_end, self.on_poll = priority, retry_failed, on_end, on_poll
        self.outcomes = [Outcome(item) for item in items]
        self.report = out / REPORT
        self._report: TextIO | None = None
        self.ended: set[int] = set()
        self.retried: set[int] = set()  # one new try per input per run: a job that always fails ends the run
        self.failed: list[tuple[int, dict[str, Any]]] = []  # the inputs that failed or were canceled: their lines

    def open_report(self) -> None:
        """This run's report, emptied, held open for the run: every line is written as its input ends. Opened
        through no link: one planted there would have had a file elsewhere emptied and the report written in it.
        Raises OutUnusable, before anything is submitted."""
        if self._report is not None:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutUnusable(f"--out {self.out}: it is a file, not a folder") from None
        except OSError as exc:
            raise OutUnusable(f"--out {self.out}: cannot write there ({exc.strerror or exc})") from None
        # O_NONBLOCK: a FIFO planted there is refused (ENXIO), not waited on for a reader.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.report, flags, 0o666)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                raise OutUnusable(self._not_a_file()) from None
            raise OutUnusable(f"--out {self.out}: cannot write there ({exc.strerror or exc})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutUnusable(self._not_a_file())
        os.ftruncate(fd, 0)
        self._report = os.fdopen(fd, "w", encoding="utf-8")

    def _not_a_file(self) -> str:
        kind = "a link" if self.report.is_symlink() else "not a file"
        return f"{self.report} is {kind}: svdq writes its report only into a file; remove it, or use another --out"

    def close(self) -> None:
        if self._report is not None:
            self._report.close()
            self._report = None

    def submit(self) -> None:
        self.open_report()
        todo = []
        for i, outcome in enumerate(self.outcomes):
            if (link := link_in(self.out, outcome.item.output)) is not None:
                outcome.error = {
                    "code": "invalid_input",
                    "message": f"output {outcome.item.output}: {link} is a link; svdq writes through none (remove it)",
                }
            elif outcome.item.problem is not None:
                outcome.error = {"code": "invalid_input", "message": outcome.item.problem}
            else:
                todo.append(i)
                continue
            self._end(i)
        submissions = (self.items[i].submission() for i in todo)
        for i, submitted in zip(todo, self.client.submit_many(submissions, priority=self.priority), strict=True):
            outcome = self.outcomes[i]
            if submitted.error is not None:
                outcome.error = {
                    "code": "invalid_input",
                    "message": f"{submitted.error.param}: {submitted.error.message}",
                }
                self._end(i)
                continue
            outcome.job, outcome.new = submitted.job, not submitted.existed

    def follow(self, poll: float = 0.5, window: int = 2000) -> None:
        """Until every input has ended: read the states of the oldest `window` unfinished jobs, in one round
        trip a poll (jobs of one priority start in the order they were sent, so those end first), and the whole
        records of those that ended. Whole records each poll were a few MB a second out of Redis per run."""
        while len(self.ended) < len(self.outcomes):
            waiting: dict[int, str] = {}
            for i, outcome in enumerate(self.outcomes):
                if i not in self.ended and outcome.job is not None:
                    waiting[i] = outcome.job.id
                    if len(waiting) == window:
                        break
            states = self.client.records.states(sorted(set(waiting.values())))
            ended = [job_id for job_id, state in states.items() if state is None or state.is_terminal()]
            records = self.client.records.get_many(ended) if ended else {}
            for i, job_id in waiting.items():
                if job_id in records:
                    self._update(i, records[job_id])
                else:
                    self.outcomes[i].seen = states[job_id]
            self.on_poll(Counter(self.outcomes[i].state for i in waiting if i not in self.ended))
            if len(self.ended) < len(self.outcomes):
                time.sleep(poll)

    def _update(self, i: int, record: JobRecord | None) -> None:
        outcome = self.outcomes[i]
        if record is None:
            outcome.error = {"code": "expired", "message": f"job {outcome.job.id} has no record (expired)"}  # type: ignore[union-attr]
            self._end(i)
            return
        outcome.record = record
        if not record.state.is_terminal():
            return
        if record.state is not JobState.SUCCEEDED and self.retry_failed and i not in self.retried:
            # Earlier runs' retries are followed to the last; then one new try per run, at most.
            assert outcome.job is not None
            key = retry_key(outcome.item.key, outcome.job.id)
            [again] = self.client.submit_many([outcome.item.submission(key)], priority=self.priority)
            if again.job is not None:
                if not again.existed:
                    self.retried.add(i)
                outcome.job, outcome.record, outcome.new = again.job, None, outcome.new or not again.existed
                outcome.seen = None
                return
        if record.state is JobState.SUCCEEDED:
            self._download(outcome)
        self._end(i)

    def _download(self, outcome: Outcome) -> None:
        """The video to its output, unless there already. Whatever the file system refuses (a folder or a link
        where the file goes, a full disk) fails this input alone: the report never says succeeded of a file
        that is not there."""
        output = outcome.item.output
        assert outcome.job is not None and outcome.record is not None and outcome.record.result is not None
        try:
            folder = open_folder(self.out, output.parent)
        except OSError as exc:
            outcome.error = unwritable(output, self.out, exc)
            return
        try:
            if is_whole(folder, output.name, outcome.record.result.bytes):
                return  # a re-run downloads only what is missing (or cut short)
            data = outcome.job.video_bytes()  # the store's errors are the run's, not this output's
            write_atomically(folder, output.name, data)
        except OSError as exc:
            outcome.error = unwritable(output, self.out, exc)
            return
        finally:
            os.close(folder)
        outcome.downloaded = True

    def _end(self, i: int, *, announce: bool = True) -> None:
        self.ended.add(i)
        outcome = self.outcomes[i]
        line = outcome.line(self.out)
        self.open_report()
        assert self._report is not None
        self._report.write(json.dumps(line) + "\n")
        self._report.flush()  # each line as its input ends: the report survives a crash
        if announce:
            self.on_end(outcome, line)
        if line["state"] in ("failed", "canceled"):
            self.failed.append((i, line))
        if outcome.record is not None and outcome.record.result is not None:
            outcome.frames = outcome.record.result.frames
        outcome.final, outcome.record = line["state"], None

    def execute(self, *, wait: bool, cancel_on_interrupt: bool) -> tuple[bool, int]:
        """Submit, then follow unless not `wait`; on Ctrl-C stop following (and cancel, if asked). The report
        gets a line for every input either way. Returns (interrupted, jobs canceled)."""
        try:
            self.submit()
            if wait:
                self.follow()
        except KeyboardInterrupt:
            canceled = self.cancel_unfinished() if cancel_on_interrupt else 0
            self.finish_report()
            self.close()
            return True, canceled
        except BaseException:
            # Redis or storage gone: the report is still whole, but the error is what the user reads, not a
            # line per input that did not end.
            self.finish_report(announce=False)
            self.close()
            raise
        self.finish_report()
        self.close()
        return False, 0

    def finish_report(self, *, announce: bool = True) -> None:
        """Lines for the inputs that have not ended (--no-wait, Ctrl-C): their state as last seen."""
        unfinished = [i for i in range(len(self.outcomes)) if i not in self.ended]
        reading = True
        # A batch at a time, each line written (and its record dropped) before the next batch is read: 100,000
        # whole records held at once took 400 MB (--no-wait on a 100,000-row manifest).
        for start in range(0, len(unfinished), READ_BATCH):
            part = unfinished[start : start + READ_BATCH]
            reading = reading and self._read_unfinished(part)
            for i in part:
                self._end(i, announce=announce)

    def _read_unfinished(self, indexes: list[int]) -> bool:
        """The whole records of jobs still waiting or running, for their lines (a retry's error, timings so far);
        polls read their states alone. One that has ended meanwhile keeps its last seen state: it is neither
        downloaded nor counted yet, and a re-run finishes it. False when Redis is gone (the lines then say what
        was seen last)."""
        jobs = {i: o.job.id for i in indexes if (o := self.outcomes[i]).job is not None and o.record is None}
        try:
            records = self.client.records.get_many(sorted(set(jobs.values())))
        except redis.RedisError:
            return False
        for i, job_id in jobs.items():
            if (record := records.get(job_id)) is not None and not record.state.is_terminal():
                self.outcomes[i].record = record
        return True

    def cancel_unfinished(self) -> int:
        canceled = 0
        for i, outcome in enumerate(self.outcomes):
            if i not in self.ended and outcome.job is not None:
                try:
                    outcome.record = outcome.job.cancel()
                    canceled += 1
                except NotCancelable:  # it ended meanwhile; the report says how
                    outcome.record = outcome.job.status()
        return canceled

    def summary(self) -> dict[str, Any]:
        states = Counter(o.state for o in self.outcomes)
        return {
            "inputs": len(self.outcomes),
            "states": dict(sorted(states.items())),
            "jobs_submitted": sum(o.new for o in self.outcomes),
            "jobs_found": len({o.job.id for o in self.outcomes if o.job is not None and not o.new}),
            "downloaded": sum(o.downloaded for o in self.outcomes),
            "frames": sum(o.frames for o in self.outcomes),
            "failed": [line for _, line in sorted(self.failed, key=lambda failed: failed[0])],  # in input order
            "report": str(self.report),
        }


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary_text(summary: dict[str, Any], out: Path) -> str:
    states = ", ".join(f"{n} {state}" for state, n in summary["states"].items())
    lines = [
        f"{counted(summary['inputs'], 'input')}: {states}; {counted(summary['jobs_submitted'], 'job')} submitted, "
        f"{summary['jobs_found']} found from before, {counted(summary['downloaded'], 'video')} downloaded to {out}"
    ]
    for line in summary["failed"]:
        error = line["error"] or {}  # a canceled job has none: it was asked to stop
        why = f": {error.get('code')}: {error.get('message')}" if error else ""
        lines.append(printable(f"  {line['state']}: {line['input']}{why}"))
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


class Display:
    """On a terminal, one bar: inputs ended of all, counts by state (the unfinished as of the latest poll),
    frames rendered, rate and ETA. Otherwise a plain line per ended input; nothing with --json."""

    ORDER = ("queued", "started", "succeeded", "failed", "canceled")

    def __init__(self, total: int, mode: str):
        self.mode, self.states, self.waiting, self.frames = mode, Counter[str](), Counter[str](), 0
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="video", dynamic_ncols=True)

    def ended(self, outcome: Outcome, line: dict[str, Any]) -> None:
        self.states[outcome.state] += 1
        for state in ("started", "queued"):  # counted among the unfinished at the last poll: not twice till the next
            if outcome.job is not None and self.waiting[state]:
                self.waiting[state] -= 1
                break
        if outcome.record is not None and outcome.record.result is not None:
            self.frames += outcome.record.result.frames
        if self.bar is not None:
            self.bar.set_postfix_str(self._counts(), refresh=False)
            self.bar.update(1)
        elif self.mode == "lines":
            what = line["output"] or (f"{line['error']['code']}: {line['error']['message']}" if line["error"] else "")
            print(printable(f"{outcome.state:<9} {outcome.item.source}  {what}"), flush=True)

    def polled(self, waiting: Counter[str]) -> None:
        self.waiting = waiting
        if self.bar is not None:
            self.bar.set_postfix_str(self._counts())

    def _counts(self) -> str:
        counts = self.waiting + self.states
        shown = [f"{state} {counts[state]}" for state in self.ORDER if counts[state]]
        return ", ".join([*shown, f"{self.frames} frames"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
