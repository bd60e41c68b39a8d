"""`svdq bulk SRC --out DIR`: a folder or a manifest of images in, a folder of videos out, resumable.

1. Read the inputs from a folder (images found recursively) or a `.csv`/`.jsonl` manifest, and check every
   row before anything is submitted: all the problems are reported at once, with their line numbers.
2. Key each input by its image's content, its effective parameters and its seed. The key is the job's
   idempotency key, so re-running the same command finds the jobs it submitted before: it submits nothing
   new, follows them, and downloads only the videos that are missing. Identical inputs share one job.
3. Submit what is new (`Client.submit_many`), follow every job, write each video atomically as it ends.
4. `DIR/svdq-bulk.jsonl` gets one line per input as it ends: the run's report, which survives a crash.

Without a seed, an input's seed derives from its content hash: a re-run renders the same video.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import redis

from producer.client import Client, Job, NotCancelable, Submission
from producer.contract import (
    InvalidParameter,
    JobParams,
    JobRecord,
    JobState,
    check_inputs,
    printable,
    shown,
    value_from_text,
)
from producer.settings import Settings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
URL_PREFIXES = ("http://", "https://", "s3://")
REPORT = "svdq-bulk.jsonl"
# A manifest column -> the parameter it sets: the contract's names, and the CLI's flags without their dashes.
COLUMNS = {name: name for name in JobParams.model_fields} | {
    "frames": "num_frames",
    "steps": "num_inference_steps",
    "min_guidance": "min_guidance_scale",
    "max_guidance": "max_guidance_scale",
}


class ManifestError(ValueError):
    """Every problem found in the inputs, one line each ("line 3: num_frames: must be ...")."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the inputs:\n  " + "\n  ".join(problems))


class Item:
    """One input: where its image is, where its video goes (relative to --out), its own parameters.

    Kept small (slots, strings rather than paths and models): a run holds one per input, 100,000 of them for a
    big manifest, for as long as it follows their jobs."""

    __slots__ = ("_image", "_local", "_output", "key", "line", "params", "problem", "seed", "source", "spec")

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
        self.problem = problem  # a bad row skipped under --skip-invalid, or an unreadable image

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
        return Submission(self.image, {**params, "seed": self.seed}, key or self.key)


# 1. Reading the inputs.


def read_inputs(src: Path) -> list[Item]:
    """The inputs named by SRC: a folder's images (sorted, recursively) or a manifest's rows."""
    if src.is_dir():
        return _folder(src)
    try:
        if src.suffix.lower() == ".csv":
            with src.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows = ((n, row) for n, row in enumerate(reader, start=2))
                return _rows(src, rows, reader.fieldnames or [], text=True)
        if src.suffix.lower() == ".jsonl":
            return _rows(src, _jsonl(src), None, text=False)
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{src}: not UTF-8 text (byte {exc.start} of a line cannot be read)"]) from None
    except csv.Error as exc:  # a cell over csv's field size limit, a NUL...
        raise ManifestError([f"{src}: not a CSV file svdq can read ({exc})"]) from None
    except OSError as exc:
        raise ManifestError([f"{src}: cannot read it ({exc.strerror or exc})"]) from None
    if src.exists():
        raise ManifestError([f"{src}: not a folder, a .csv or a .jsonl manifest"])
    raise ManifestError([f"{src}: no such file or folder"])


def _folder(src: Path) -> list[Item]:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems = Counter(p.with_suffix("") for p in files)
    items = []
    for path in files:
        rel = PurePosixPath(path.relative_to(src).as_posix())
        # cat.png -> cat.mp4, unless cat.jpg sits beside it: then cat.png.mp4 and cat.jpg.mp4
        output = rel.with_suffix("") if stems[path.with_suffix("")] == 1 else rel
        items.append(Item(source=str(rel), image=path, output=output))
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


def _rows(src: Path, rows: Iterator[tuple[int, dict[str, Any]]], header: list[str] | None, text: bool) -> list[Item]:
    """A bad row becomes an Item with its `problem` set: all of them are reported together, or skipped."""
    if header is not None:
        problems = [
            f"line 1: unknown column {c!r}" for c in header if c not in COLUMNS and c not in ("image", "output")
        ]
        if "image" not in header:
            problems.append("line 1: no 'image' column")
        if problems:
            raise ManifestError(problems)
    items = []
    for n, row in rows:
        try:
            items.append(_row(src, n, row, text))
        except ValueError as exc:
            name = str(row.get("image") or f"line {n}")
            items.append(Item(name, name, PurePosixPath(f"line-{n}"), line=n, problem=str(exc)))
    return items


def _row(src: Path, n: int, row: dict[str, Any], text: bool) -> Item:
    if "__error__" in row:
        raise ValueError(row["__error__"])
    if unknown := sorted(c for c in row if c not in COLUMNS and c not in ("image", "output")):
        raise ValueError(f"unknown field {unknown[0]!r}")
    image = str(row.get("image") or "").strip()
    if not image:
        raise ValueError("image: empty")
    params = {
        COLUMNS[column]: value_from_text(value) if text else value
        for column, value in row.items()
        if column not in ("image", "output") and value not in (None, "")
    }
    if image.startswith(URL_PREFIXES):
        source: Path | str = image
        default_output = PurePosixPath(PurePosixPath(image.split("?", 1)[0]).name or f"line-{n}").with_suffix("")
    else:
        try:
            source = (src.parent / image).resolve()
            found = source.is_file()
        except OSError as exc:  # a name too long for the file system...
            raise ValueError(f"image: cannot read {shown(image)}: {exc.strerror or exc}") from None
        if not found:
            raise ValueError(f"image: no such file: {image}")
        default_output = PurePosixPath(Path(image).as_posix()).with_suffix("")
    output = PurePosixPath(str(row["output"])) if row.get("output") else default_output
    if output.is_absolute() or ".." in output.parts or not output.parts:
        raise ValueError(f"output: must be a relative path inside --out (got {str(output)!r})")
    return Item(source=image, image=source, output=output, params=params, line=n)


# 2. Keys, seeds and checks.


def content_hash(item: Item) -> str:
    data = item.image.read_bytes() if isinstance(item.image, Path) else item.image.encode()
    return hashlib.sha256(data).hexdigest()


def plan(items: list[Item], defaults: dict[str, Any], settings: Settings) -> list[str]:
    """Effective parameters, seed, output suffix and key for each input (its row's own parameters are merged in
    and dropped); returns every problem found, by line."""
    writers: dict[PurePosixPath, Item] = {}
    specs: dict[str, str] = {}
    for item in items:
        if item.problem is not None:
            continue
        try:
            digest = content_hash(item)
        except OSError as exc:  # gone or unreadable since it was listed
            item.problem = f"image: cannot read {shown(item.source)}: {exc.strerror or exc}"
            continue
        merged = {**defaults, **item.params}
        merged.setdefault("seed", int(digest[:8], 16))  # the same image renders the same video on a re-run
        try:
            effective = check_inputs(merged)
            settings.check_caps(effective)
        except InvalidParameter as exc:
            item.problem = f"{exc.param}: {exc.message}"
            continue
        if item.output.suffix != f".{effective.format}":
            item.output = item.output.with_name(f"{item.output.name}.{effective.format}")
        # Rows mostly differ by their seed alone: one shared string for the rest (a run holds one per input).
        spec = json.dumps(effective.model_dump(exclude={"seed"}), sort_keys=True)
        item.spec, item.seed, item.params = specs.setdefault(spec, spec), effective.seed, {}
        canonical = json.dumps({"image": digest, "params": effective.model_dump()}, sort_keys=True)
        item.key = "bulk-" + hashlib.sha256(canonical.encode()).hexdigest()
        other = writers.setdefault(item.output, item)
        if other.key != item.key:  # two different videos for one file
            item.problem = f"output: {item.output} is also the output of {other.source} (give each row its own)"
    return [f"{f'line {i.line}' if i.line else i.source}: {i.problem}" for i in items if i.problem is not None]


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


def write_atomically(path: Path, data: bytes) -> None:
    """The whole file or none of it, even across a crash: a partial file next to it, synced, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with partial.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


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
        self.ended: set[int] = set()
        self.retried: set[int] = set()  # one new try per input per run: a job that always fails ends the run
        self.failed: list[tuple[int, dict[str, Any]]] = []  # the inputs that failed or were canceled: their lines

    def submit(self) -> None:
        out_root = self.out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.report.write_text("")  # this run's report; every line is appended as its input ends
        todo = []
        for i, outcome in enumerate(self.outcomes):
            target = (self.out / outcome.item.output).resolve()
            if not target.is_relative_to(out_root):  # a link inside --out that leads outside it
                outcome.error = {"code": "invalid_input", "message": f"output {outcome.item.output} leaves --out"}
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
        path = self.out / outcome.item.output
        assert outcome.job is not None and outcome.record is not None and outcome.record.result is not None
        if path.is_file() and path.stat().st_size == outcome.record.result.bytes:
            return  # a re-run downloads only what is missing (or cut short)
        if not path.resolve().is_relative_to(self.out.resolve()):  # again: a folder may have become a link
            outcome.error = {"code": "invalid_input", "message": f"output {outcome.item.output} leaves --out"}
            return
        write_atomically(path, outcome.job.video_bytes())
        outcome.downloaded = True

    def _end(self, i: int, *, announce: bool = True) -> None:
        self.ended.add(i)
        outcome = self.outcomes[i]
        line = outcome.line(self.out)
        with self.report.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
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
            return True, canceled
        except BaseException:
            # Redis or storage gone: the report is still whole, but the error is what the user reads, not a
            # line per input that did not end.
            self.finish_report(announce=False)
            raise
        self.finish_report()
        return False, 0

    def finish_report(self, *, announce: bool = True) -> None:
        """Lines for the inputs that have not ended (--no-wait, Ctrl-C): their state as last seen."""
        unfinished = [i for i in range(len(self.outcomes)) if i not in self.ended]
        self._read_unfinished(unfinished)
        for i in unfinished:
            self._end(i, announce=announce)

    def _read_unfinished(self, indexes: list[int], batch: int = 2000) -> None:
        """The whole records of jobs still waiting or running, for their lines (a retry's error, timings so far);
        polls read their states alone. One that has ended meanwhile keeps its last seen state: it is neither
        downloaded nor counted yet, and a re-run finishes it."""
        jobs = {i: o.job.id for i in indexes if (o := self.outcomes[i]).job is not None and o.record is None}
        ids = sorted(set(jobs.values()))
        records: dict[str, JobRecord | None] = {}
        try:
            for start in range(0, len(ids), batch):
                records.update(self.client.records.get_many(ids[start : start + batch]))
        except redis.RedisError:  # Redis gone: the lines say what was seen last
            return
        for i, job_id in jobs.items():
            if (record := records.get(job_id)) is not None and not record.state.is_terminal():
                self.outcomes[i].record = record

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
        error = line["error"] or {}
        lines.append(printable(f"  {line['state']}: {line['input']}: {error.get('code')}: {error.get('message')}"))
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
