"""`svdq bulk`'s inputs, keys and seeds: pure logic, no services."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, cast

import pytest
from PIL import Image

from producer.bulk import REPORT, Item, ManifestError, OutUnusable, Run, plan, read_inputs, retry_key, summary_text
from producer.client import Client, Intake
from producer.contract import InvalidParameter, JobState, shown
from producer.settings import Settings
from producer.storage import FileStore


def picture(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(path)
    return path


WHERE = "where images are read from (--images-root DIR names another)"


@pytest.fixture
def intake(tmp_path_factory: pytest.TempPathFactory) -> Intake:
    """A submit's checks, with a file store of its own (its buckets: none)."""
    return Intake(Settings(allow_private_urls=False), FileStore(tmp_path_factory.mktemp("store")))


def test_a_folder_mirrors_its_layout_and_same_stem_images_keep_their_suffix(tmp_path: Path, intake: Intake) -> None:
    picture(tmp_path / "a" / "cat.png", 1)
    picture(tmp_path / "a" / "cat.jpg", 2)
    picture(tmp_path / "a" / "b" / "dog.PNG", 3)
    (tmp_path / "a" / "readme.md").write_text("skipped")
    items = read_inputs(tmp_path)
    assert [(i.source, str(i.output)) for i in items] == [
        ("a/b/dog.PNG", "a/b/dog"),
        ("a/cat.jpg", "a/cat.jpg"),
        ("a/cat.png", "a/cat.png"),
    ]
    assert plan(items, {}, intake) == []
    assert [str(i.output) for i in items] == ["a/b/dog.mp4", "a/cat.jpg.mp4", "a/cat.png.mp4"]


def test_seeds_and_keys_follow_the_content_and_the_parameters(tmp_path: Path, intake: Intake) -> None:
    picture(tmp_path / "x.png", 10)
    picture(tmp_path / "copy" / "x.png", 10)
    picture(tmp_path / "y.png", 20)
    items = read_inputs(tmp_path)
    assert plan(items, {"num_frames": 4}, intake) == []
    copy, x, y = items
    assert copy.key == x.key and copy.effective == x.effective  # identical inputs: one job
    assert x.effective is not None and y.effective is not None
    assert x.effective.seed != y.effective.seed and x.key != y.key
    again = read_inputs(tmp_path)
    plan(again, {"num_frames": 4}, intake)
    assert [i.key for i in again] == [i.key for i in items]  # a re-run finds the same jobs
    other = read_inputs(tmp_path)
    plan(other, {"num_frames": 6}, intake)
    assert other[1].key != x.key and other[1].effective.seed == x.effective.seed  # type: ignore[union-attr]
    plan(pinned := read_inputs(tmp_path), {"seed": 5}, intake)
    assert {i.effective.seed for i in pinned} == {5}  # type: ignore[union-attr]
    assert retry_key(x.key, "abc") != x.key and len(retry_key(x.key, "f" * 32)) <= 200


def test_every_manifest_problem_is_reported_with_its_line(tmp_path: Path, intake: Intake) -> None:
    picture(tmp_path / "ok.png", 1)
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("image,frame_count,steps\nok.png,3,2\nok.png,3,many\n")
    with pytest.raises(ManifestError, match="line 1: unknown column 'frame_count'") as raised:
        read_inputs(bad_header)
    # The rows are read all the same: their problems come in the same report, not after the header is fixed.
    assert raised.value.items is not None and len(raised.value.items) == 2
    assert plan(raised.value.items, {}, intake) == ["line 3: steps: Input should be a valid integer (got 'many')"]
    twice = tmp_path / "t.csv"  # a parameter set by two columns; cells past the header
    twice.write_text("image,frames,num_frames\nok.png,4,0\nok.png,4,,x\n")
    assert plan(read_inputs(twice), {}, intake) == [
        "line 2: frames and num_frames both set num_frames: give one; num_frames: must be 1 to 128 (got 0)",
        "line 3: 1 cell(s) past the header's last column",
    ]
    no_image = tmp_path / "n.csv"
    no_image.write_text("picture,frames\nok.png,3\n")
    with pytest.raises(ManifestError) as raised:
        read_inputs(no_image)
    assert raised.value.problems == ["line 1: unknown column 'picture'", "line 1: no 'image' column"]
    assert raised.value.items is None
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"image": "ok.png", "output": "a"},
        {"image": "ok.png", "steps": "many"},
        {"image": "ok.png", "color": 1, "steps": 0},  # the unknown field, and the rest checked all the same
        {"image": "missing.png"},
        {"image": "ok.png", "output": "/abs"},
        {"image": "ok.png", "output": "a", "seed": 9},
        {"image": "ok.png", "output": "g", "min_guidance": 5},  # a check of two: the row's name for the one it set
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    items = read_inputs(manifest)
    problems = plan(items, {}, intake)
    assert problems == [
        "line 2: steps: Input should be a valid integer (got 'many')",  # the row's word for it
        "line 3: unknown field 'color'; steps: must be 1 to 200 (got 0)",
        "line 4: image: no such file: missing.png",
        "line 5: output: must be a relative path inside --out (got '/abs')",
        "line 6: output: a.mp4 is also the output of ok.png (give each row its own)",
        "line 7: max_guidance_scale: must be >= min_guidance (got 3; min_guidance is 5)",
        "line 8: not JSON (Expecting value)",
    ]
    assert items[0].problem is None and items[0].output == PurePosixPath("a.mp4")


def test_csv_cells_are_read_as_numbers_where_they_are_numbers(tmp_path: Path, intake: Intake) -> None:
    picture(tmp_path / "ok.png", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,frames,decode_chunk_size,min_guidance,format\nok.png,6,auto,1.5,webm\n")
    [item] = read_inputs(manifest)
    assert plan([item], {"num_frames": 4}, intake) == []
    assert item.effective is not None and item.effective.num_frames == 6 and item.effective.min_guidance_scale == 1.5
    assert item.effective.decode_chunk_size == "auto" and str(item.output) == "ok.webm"


def test_manifests_a_parser_chokes_on_are_one_clear_error_each(tmp_path: Path, intake: Intake) -> None:
    """Each of these was a traceback: a cell over csv's field limit, bytes that are not UTF-8, JSON nested past the
    parser's recursion, an image name too long for the file system."""
    picture(tmp_path / "ok.png", 10)
    big = tmp_path / "big.csv"
    big.write_text("image,frames\nok.png," + "9" * 200_000 + "\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"image\n\xe9t\xe9.png\n")
    for manifest, says in ((big, "not a CSV file svdq can read"), (latin, "not UTF-8 text")):
        with pytest.raises(ManifestError, match=says):
            read_inputs(manifest)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"image": "ok.png"}\n' + "[" * 100_000 + "]" * 100_000 + "\n" + '{"image": "' + "x" * 300 + '"}\n')
    items = read_inputs(deep)
    assert [item.problem for item in items] == [
        None,
        "not JSON svdq reads (nested too deeply)",
        f"image: cannot read '{'x' * 76}...: File name too long",
    ]


def test_image_references_are_checked_as_a_submit_checks_them_before_anything_is_submitted(
    tmp_path: Path, intake: Intake
) -> None:
    """Another bucket, a metadata service's address and a file over SVDQ_MAX_IMAGE_BYTES were refused only at
    submit, after the good rows had gone in. A file that is no image stays its own line's failure, at submit."""
    picture(tmp_path / "d.png", 1)
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + bytes(5000))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    manifest = tmp_path / "m.csv"
    rows = ["d.png", "s3://otherbucket/secret.png", "http://169.254.169.254/latest/meta-data/iam", "big.png"]
    manifest.write_text("image\n" + "\n".join([*rows, "corrupt.png"]) + "\n")
    intake.settings.max_image_bytes = 4000
    assert plan(read_inputs(manifest), {}, intake) == [
        "line 3: image: no image at s3://otherbucket/secret.png that this service may read",
        "line 4: image: 169.254.169.254 resolves to a non-public address (169.254.169.254)",
        "line 5: image: larger than SVDQ_MAX_IMAGE_BYTES=4000",
    ]


def test_images_are_read_from_inside_the_images_root_only(tmp_path: Path, intake: Intake) -> None:
    """An absolute path, a way up and a link out of the manifest's folder were read and uploaded to the store."""
    secret = picture(tmp_path / "private" / "secret.png", 9)
    jobs = tmp_path / "jobs"
    picture(jobs / "ok.png", 1)
    (jobs / "link.png").symlink_to(secret)
    (jobs / "up").symlink_to(tmp_path / "private")
    manifest = jobs / "m.jsonl"
    images = ["ok.png", str(secret), "../private/secret.png", "link.png", "up/secret.png", "/nowhere/x.png"]
    manifest.write_text("".join(json.dumps({"image": image}) + "\n" for image in images))
    items = read_inputs(manifest)
    root = jobs.resolve()
    assert [item.problem for item in items] == [
        None,
        *(f"image: {image!r} leads outside {root}, {WHERE}" for image in images[1:]),
    ]
    widened = read_inputs(manifest, images_root=tmp_path)
    assert [item.problem for item in widened[:-1]] == [None] * 5
    assert widened[-1].problem == f"image: {'/nowhere/x.png'!r} leads outside {tmp_path.resolve()}, {WHERE}"
    assert plan(widened[:-1], {}, intake) == []
    assert [str(item.output) for item in widened[:-1]] == [
        "ok.mp4",
        "private/secret.mp4",
        "private/secret.mp4",
        "link.mp4",
        "up/secret.mp4",
    ]

    folder = tmp_path / "photos"
    picture(folder / "mine.png", 2)
    (folder / "theirs.png").symlink_to(secret)
    assert [(item.source, item.problem) for item in read_inputs(folder)] == [
        ("mine.png", None),
        (
            "theirs.png",
            f"image: 'theirs.png' leads outside {folder.resolve()}, {WHERE}",
        ),
    ]


def test_outputs_the_file_system_would_refuse_are_problems_before_anything_is_submitted(
    tmp_path: Path, intake: Intake
) -> None:
    """Each was a traceback once its video had rendered: a file and a folder of one name, a name over 255 bytes,
    a NUL."""
    picture(tmp_path / "a.png", 1)
    picture(tmp_path / "b.png", 2)
    manifest = tmp_path / "m.jsonl"
    outputs = [
        "a",
        "a.mp4/b",
        "c.mp4/d",
        "c",
        "x" * 300,
        "nul\x00.mp4",
        "esc\x1b[2J",
        "svdq-bulk.jsonl/v",
        "/".join(["y" * 200] * 6),
    ]
    manifest.write_text(
        "".join(
            json.dumps({"image": "ab"[n % 2] + ".png", "output": output}) + "\n" for n, output in enumerate(outputs)
        )
    )
    assert plan(read_inputs(manifest), {}, intake) == [
        "line 2: output: a.mp4 is the output of a.png, so it cannot be a folder too",
        "line 4: output: c.mp4 is also a folder, for the output of a.png (give each row its own)",
        f"line 5: output: a name in {shown('x' * 300 + '.mp4')} is 304 bytes long, over 255",
        "line 6: output: 'nul\\x00.mp4' holds control characters",
        "line 7: output: 'esc\\x1b[2J.mp4' holds control characters",
        "line 8: output: svdq-bulk.jsonl is the run's report",
        f"line 9: output: {shown(outputs[-1] + '.mp4')} is 1,209 bytes long, over 1,024",
    ]


def test_an_image_is_hashed_a_chunk_at_a_time_and_one_over_the_cap_is_not_read(tmp_path: Path, intake: Intake) -> None:
    """Each file was read whole into memory to be hashed, before any size check: 880 MB of RSS for an 800 MB file."""
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB to read, none to write
    manifest = tmp_path / "m.csv"
    manifest.write_text("image\nbig.png\n")
    intake.settings.max_image_bytes = 2**20
    tracemalloc.start()
    try:
        problems = plan(read_inputs(manifest), {}, intake)
        over_the_cap = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        intake.settings.max_image_bytes = 2**30
        hashed = read_inputs(manifest)
        assert plan(hashed, {}, intake) == []
        under_the_cap = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problems == ["line 2: image: larger than SVDQ_MAX_IMAGE_BYTES=1048576"]
    assert over_the_cap < 4 * 2**20 and under_the_cap < 4 * 2**20, (over_the_cap, under_the_cap)
    assert hashed[0].seed == int(hashlib.sha256(bytes(64 * 2**20)).hexdigest()[:8], 16)


class Rendered:
    """A job that has ended with `video`, for the run's download."""

    def __init__(self, video: bytes):
        self.id, self.video = "f" * 32, video

    def video_bytes(self) -> bytes:
        return self.video

    def record(self) -> Any:
        result = SimpleNamespace(bytes=len(self.video), seed=1, frames=4)
        return SimpleNamespace(state=JobState.SUCCEEDED, result=result, error=None, timings={})


def downloaded(out: Path, outputs: list[str], video: bytes = b"the video") -> Run:
    """A run over inputs whose jobs have all rendered `video`, each downloaded and its line reported."""
    items = [Item(f"in-{n}.png", f"in-{n}.png", PurePosixPath(output)) for n, output in enumerate(outputs)]
    run = Run(cast(Client, None), items, out, priority="low", retry_failed=False)
    for i, outcome in enumerate(run.outcomes):
        job = Rendered(video)
        outcome.job, outcome.record = cast(Any, job), job.record()
        run._download(outcome)
        run._end(i)
    run.close()
    return run


def test_links_planted_in_out_never_take_a_write_outside_it(tmp_path: Path) -> None:
    """A link at the report's name had a file elsewhere emptied and the report written in it; one at the partial
    file's name, known in advance, had the video written wherever it led and then put in place of the output."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "victim.txt"
    victim.write_text("precious")
    (out / REPORT).symlink_to(victim)
    run = Run(cast(Client, None), [], out, priority="low", retry_failed=False)
    with pytest.raises(OutUnusable, match=f"^{out / REPORT} is a link: .*remove it"):
        run.open_report()
    assert victim.read_text() == "precious"

    (out / REPORT).unlink()
    (out / f".v.mp4.{os.getpid()}.part").symlink_to(victim)  # the partial file's name was this process's
    (out / "same.mp4").symlink_to(victim)  # as long as the video: it passed for one downloaded before
    (out / "sub").symlink_to(elsewhere)  # planted once the run had checked its outputs
    run = downloaded(out, ["v.mp4", "same.mp4", "sub/w.mp4"], video=b"12345678")
    assert victim.read_text() == "precious" and sorted(elsewhere.iterdir()) == [victim]
    for name in ("v.mp4", "same.mp4"):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == b"12345678"
    lines = [json.loads(line) for line in (out / REPORT).read_text().splitlines()]
    assert [line["state"] for line in lines] == ["succeeded", "succeeded", "failed"]
    assert lines[2]["error"] == {
        "code": "output_unwritable",
        "message": f"cannot write {out / 'sub/w.mp4'}: a folder on its way is a link or a file; "
        "svdq writes only inside --out, through no link",
    }
    assert not list(out.rglob(".svdq-*"))  # no partial file left behind


def test_an_output_the_file_system_refuses_fails_its_own_line(tmp_path: Path) -> None:
    """A folder where the video goes was a traceback after the render, with the line before it reported
    succeeded though its file was not there."""
    out = tmp_path / "out"
    (out / "taken.mp4").mkdir(parents=True)
    (out / "file").write_text("a file where a folder goes")
    run = downloaded(out, ["ok.mp4", "taken.mp4", "file/v.mp4", "after.mp4"])
    lines = [json.loads(line) for line in (out / REPORT).read_text().splitlines()]
    assert [(line["state"], line["output"]) for line in lines] == [
        ("succeeded", str(out / "ok.mp4")),
        ("failed", None),
        ("failed", None),
        ("succeeded", str(out / "after.mp4")),
    ]
    assert lines[1]["error"] == {
        "code": "output_unwritable",
        "message": f"cannot write {out / 'taken.mp4'}: Is a directory",
    }
    assert lines[2]["error"]["code"] == "output_unwritable"
    assert [o.downloaded for o in run.outcomes] == [True, False, False, True]
    assert (out / "after.mp4").read_bytes() == b"the video" and not list(out.rglob(".svdq-*"))


def test_the_summary_names_a_canceled_input_without_an_error_it_does_not_have(tmp_path: Path) -> None:
    """A canceled job has no error: the summary printed `canceled: a/dog.jpg: None: None`."""
    summary = {
        "inputs": 2,
        "states": {"canceled": 1, "failed": 1},
        "jobs_submitted": 2,
        "jobs_found": 0,
        "downloaded": 0,
        "failed": [
            {"state": "canceled", "input": "a/dog.jpg", "error": None},
            {"state": "failed", "input": "b.png", "error": {"code": "invalid_input", "message": "not an image"}},
        ],
        "report": str(tmp_path / "svdq-bulk.jsonl"),
    }
    text = summary_text(summary, tmp_path)
    assert "  canceled: a/dog.jpg\n" in text and "None" not in text
    assert "  failed: b.png: invalid_input: not an image" in text


def test_an_image_swapped_after_it_was_checked_is_not_what_is_submitted(tmp_path: Path, intake: Intake) -> None:
    """helper-23's probe: the plan checked a file inside the root, the submit read whatever the path led to then.
    A link swapped in for it (to a file outside the root) or new bytes must fail that line, naming it."""
    src, outside = tmp_path / "src", picture(tmp_path / "private" / "secret.png", 200)
    picture(src / "a.png", 1)
    picture(src / "b.png", 2)
    picture(src / "c.png", 4)
    items = read_inputs(src)
    assert plan(items, {"num_frames": 4}, intake) == []

    def submitted(item: Item) -> Any:
        image = item.submission().image
        return intake.check(image, priority="normal", idempotency_key=None, webhook=None, params={"num_frames": 4})

    assert submitted(items[0]).data == (src / "a.png").read_bytes()  # unchanged: read as before
    (src / "a.png").unlink()
    (src / "a.png").symlink_to(outside)
    picture(src / "b.png", 3)  # the same name, other bytes
    for item in items[:2]:
        with pytest.raises(InvalidParameter, match=rf"image: '?{item.source}'? changed since it was checked"):
            submitted(item)
    (src / "c.png").unlink()
    os.mkfifo(src / "c.png")  # no one writes to it: opening it to read blocked the whole run (helper-25)
    with pytest.raises(InvalidParameter, match=r"image: '?c.png'? is no longer a file"):
        submitted(items[2])
