"""`svdq bulk`'s inputs, keys and seeds: pure logic, no services."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest
from PIL import Image

from producer.bulk import ManifestError, plan, read_inputs, retry_key
from producer.settings import Settings


def picture(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(path)
    return path


def test_a_folder_mirrors_its_layout_and_same_stem_images_keep_their_suffix(tmp_path: Path) -> None:
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
    assert plan(items, {}, Settings()) == []
    assert [str(i.output) for i in items] == ["a/b/dog.mp4", "a/cat.jpg.mp4", "a/cat.png.mp4"]


def test_seeds_and_keys_follow_the_content_and_the_parameters(tmp_path: Path) -> None:
    picture(tmp_path / "x.png", 10)
    picture(tmp_path / "copy" / "x.png", 10)
    picture(tmp_path / "y.png", 20)
    items = read_inputs(tmp_path)
    assert plan(items, {"num_frames": 4}, Settings()) == []
    copy, x, y = items
    assert copy.key == x.key and copy.effective == x.effective  # identical inputs: one job
    assert x.effective is not None and y.effective is not None
    assert x.effective.seed != y.effective.seed and x.key != y.key
    again = read_inputs(tmp_path)
    plan(again, {"num_frames": 4}, Settings())
    assert [i.key for i in again] == [i.key for i in items]  # a re-run finds the same jobs
    other = read_inputs(tmp_path)
    plan(other, {"num_frames": 6}, Settings())
    assert other[1].key != x.key and other[1].effective.seed == x.effective.seed  # type: ignore[union-attr]
    plan(pinned := read_inputs(tmp_path), {"seed": 5}, Settings())
    assert {i.effective.seed for i in pinned} == {5}  # type: ignore[union-attr]
    assert retry_key(x.key, "abc") != x.key and len(retry_key(x.key, "f" * 32)) <= 200


def test_every_manifest_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    picture(tmp_path / "ok.png", 1)
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("image,frame_count\nok.png,3\n")
    with pytest.raises(ManifestError, match="line 1: unknown column 'frame_count'"):
        read_inputs(bad_header)
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"image": "ok.png", "output": "a"},
        {"image": "ok.png", "steps": "many"},
        {"image": "ok.png", "color": 1},
        {"image": "/etc/passwd.png"},
        {"image": "ok.png", "output": "/abs"},
        {"image": "ok.png", "output": "a", "seed": 9},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    items = read_inputs(manifest)
    problems = plan(items, {}, Settings())
    assert problems == [
        "line 2: num_inference_steps: Input should be a valid integer (got 'many')",
        "line 3: unknown field 'color'",
        "line 4: image: no such file: /etc/passwd.png",
        "line 5: output: must be a relative path inside --out (got '/abs')",
        "line 6: output: a.mp4 is also the output of ok.png (give each row its own)",
        "line 7: not JSON (Expecting value)",
    ]
    assert items[0].problem is None and items[0].output == PurePosixPath("a.mp4")


def test_csv_cells_are_read_as_numbers_where_they_are_numbers(tmp_path: Path) -> None:
    picture(tmp_path / "ok.png", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,frames,decode_chunk_size,min_guidance,format\nok.png,6,auto,1.5,webm\n")
    [item] = read_inputs(manifest)
    assert plan([item], {"num_frames": 4}, Settings()) == []
    assert item.effective is not None and item.effective.num_frames == 6 and item.effective.min_guidance_scale == 1.5
    assert item.effective.decode_chunk_size == "auto" and str(item.output) == "ok.webm"


def test_manifests_a_parser_chokes_on_are_one_clear_error_each(tmp_path: Path) -> None:
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
