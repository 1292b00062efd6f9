"""The on-disk output of the encode job: deterministic shards, atomic writes, checked reads, joined parts."""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import encodings
from client.encodings import (
    MANIFEST,
    EncodingsError,
    create_directory,
    merged_manifest,
    part_directory_name,
    read_encodings,
    same_input,
    same_latent_space,
    sha256_bytes,
    shard_bytes,
    split_rows,
    write_atomic,
    write_manifest,
)

MODEL = {"name": "vae", "version": "1", "kind": "vae", "latent_dim": 2, "encoder_sha256": "ab" * 32}


def rows(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = np.arange(start, stop, dtype=np.int64)
    mean = np.stack([index, -index], axis=1).astype(np.float32)
    return index, mean, mean / 10


def write_output(
    directory: Path,
    start: int,
    stop: int,
    per_shard: int,
    total: int,
    *,
    complete: bool = True,
    part: int = 0,
    parts: int = 1,
) -> dict[str, Any]:
    """An output directory as the job writes it, for rows [start, stop) of `total`."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, a in enumerate(range(start, stop, per_shard)):
        data = shard_bytes(*rows(a, min(a + per_shard, stop)))
        name = f"shard-{number:05d}.npz"
        (directory / name).write_bytes(data)
        shards.append(
            {"file": name, "start": a, "stop": min(a + per_shard, stop), "sha256": sha256_bytes(data)}
        )
    manifest = {
        "format_version": 1,
        "input": {"path": "/data/x.npy", "format": "npy", "rows": total, "sha256": "cd" * 32},
        "model": MODEL,
        "range": {"part": part, "parts": parts, "start": start, "stop": stop},
        "rows": stop - start,
        "rows_per_shard": per_shard,
        "shards": shards,
        "complete": complete,
    }
    write_manifest(directory, manifest)
    return manifest


@pytest.mark.parametrize(("total", "parts"), [(10, 3), (10_000, 7), (2, 5), (0, 1)])
def test_split_rows_covers_every_row_once_in_near_equal_contiguous_ranges(total: int, parts: int) -> None:
    ranges = [split_rows(total, parts, part) for part in range(parts)]
    assert ranges[0].start == 0 and ranges[-1].stop == total
    assert all(a.stop == b.start for a, b in itertools.pairwise(ranges))
    sizes = [r.rows for r in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_split_rows_refuses_an_index_outside_the_shards() -> None:
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        split_rows(10, 4, 4)


def test_shard_bytes_are_the_same_for_the_same_rows_and_load_with_numpy(tmp_path: Path) -> None:
    first = shard_bytes(*rows(0, 5))
    assert shard_bytes(*rows(0, 5)) == first
    # No clock in them: two calls a second apart would agree anyway (zip times have 2 s steps).
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert {member.date_time for member in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    (tmp_path / "s.npz").write_bytes(first)
    with np.load(tmp_path / "s.npz") as loaded:
        np.testing.assert_array_equal(loaded["index"], np.arange(5))
        np.testing.assert_array_equal(loaded["mean"], rows(0, 5)[1])
        # The encoder's own float32, little-endian whatever the machine: no digit of a code is lost.
        dtypes = {name: loaded[name].dtype.str for name in loaded.files}
        assert dtypes == {"index": "<i8", "mean": "<f4", "log_var": "<f4"}


def test_a_crash_before_the_rename_leaves_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_atomic(path, b"old")

    def crash() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"new", before_rename=crash)
    assert path.read_bytes() == b"old"
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_write_over_a_longer_temporary_file_left_by_a_killed_run_leaves_exactly_the_new_bytes(
    tmp_path: Path,
) -> None:
    """The temporary name is the same on every run: the tail of an older, longer file must not follow."""
    path = tmp_path / "manifest.json"
    (tmp_path / "manifest.json.tmp").write_bytes(b"x" * 1000)
    write_atomic(path, b"{}\n")
    assert path.read_bytes() == b"{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_write_that_fails_leaves_the_old_file_whole_and_no_half_file_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "codes.npy"
    write_atomic(path, b"old")
    written: list[int] = []

    def disk_fills_up(descriptor: int, data: memoryview) -> int:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        return real_write(descriptor, data[:2])  # part of it, as a short write does

    real_write = os.write
    monkeypatch.setattr(os, "write", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["codes.npy"]


def test_a_written_file_takes_its_name_and_then_its_folder_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is durable only once the folder is synced: before, a crash may lose the new name."""
    path = tmp_path / "shard.npz"
    synced: list[tuple[Path, bool]] = []

    def sync(folder: Path) -> None:
        synced.append((folder, path.exists()))

    monkeypatch.setattr("client.encodings.fsync_directory", sync)
    write_atomic(path, b"data")
    assert synced == [(tmp_path, True)]  # the folder, once the file has its name
    assert path.read_bytes() == b"data"


class OsWith:
    """The os module as client.encodings sees it, with some of its calls replaced."""

    def __init__(self, **replaced: Any) -> None:
        self.replaced = replaced

    def __getattr__(self, name: str) -> Any:
        return self.replaced.get(name, getattr(os, name))


def test_a_shard_is_synced_whole_under_its_temporary_name_before_it_takes_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renamed before its bytes are on disk, a crash could leave a torn shard under the final name."""
    path = tmp_path / "shard-00000.npz"
    data = shard_bytes(*rows(0, 5))
    synced: list[tuple[str, int, bool]] = []

    def fsync(descriptor: int) -> None:
        status = os.fstat(descriptor)
        kind = "file" if stat.S_ISREG(status.st_mode) else "folder"
        synced.append((kind, status.st_size if kind == "file" else 0, path.exists()))
        os.fsync(descriptor)

    monkeypatch.setattr(encodings, "os", OsWith(fsync=fsync))
    write_atomic(path, data)
    assert synced == [("file", len(data), False), ("folder", 0, True)]
    assert path.read_bytes() == data


def test_a_shard_whose_write_fails_midway_leaves_nothing_under_its_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write is followed by another; a full disk after it stops the write before any rename."""
    path = tmp_path / "shard-00000.npz"
    written: list[int] = []

    def write(descriptor: int, data: memoryview) -> int:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(os.write(descriptor, data[:100]))
        return written[-1]

    monkeypatch.setattr(encodings, "os", OsWith(write=write))
    with pytest.raises(OSError, match="No space left on device"):
        write_atomic(path, shard_bytes(*rows(0, 5)))
    assert not path.exists()


def test_a_new_output_folder_is_made_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr("client.encodings.fsync_directory", synced.append)
    create_directory(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert synced == [tmp_path, tmp_path / "a"]  # each new entry, outermost first
    synced.clear()
    create_directory(tmp_path / "a" / "b")
    assert synced == []


def test_read_encodings_returns_every_row_in_order(tmp_path: Path) -> None:
    write_output(tmp_path, 0, 10, 4, 10)
    index, mean, log_var = read_encodings(tmp_path)
    expected = rows(0, 10)
    np.testing.assert_array_equal(index, expected[0])
    np.testing.assert_array_equal(mean, expected[1])
    assert log_var is not None
    np.testing.assert_array_equal(log_var, expected[2])


def test_read_encodings_refuses_an_unfinished_output(tmp_path: Path) -> None:
    manifest = write_output(tmp_path, 0, 8, 4, 10)
    write_manifest(tmp_path, {**manifest, "shards": manifest["shards"][:1], "complete": False})
    with pytest.raises(EncodingsError, match=r"4 of 8 rows.*--resume"):
        read_encodings(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda shards: shards[:1] + shards[2:], r"shard 1 is shard-00002.npz with rows \[8, 10\), expected"),
        (lambda shards: shards[:2] + shards[1:], r"shard 2 is shard-00001.npz with rows \[4, 8\), expected"),
        (lambda shards: shards[::-1], r"shard 0 is shard-00002.npz"),
        (lambda shards: shards[:2], r"says complete=True with rows \[0, 8\) of \[0, 10\)"),
    ],
    ids=["a shard left out", "a shard twice", "out of order", "complete too soon"],
)
def test_a_manifest_whose_shards_do_not_cover_its_rows_once_each_in_order_is_refused(
    tmp_path: Path, edit: Any, message: str
) -> None:
    manifest = write_output(tmp_path, 0, 10, 4, 10)
    write_manifest(tmp_path, {**manifest, "shards": edit(manifest["shards"])})
    with pytest.raises(EncodingsError, match=message):
        read_encodings(tmp_path)


def test_a_manifest_of_shards_longer_than_its_rows_per_shard_is_refused_though_they_read_whole(
    tmp_path: Path,
) -> None:
    """A resume after shard 0 of rows 0-7 would go on with shard 1 at row 4, and hold rows 4-7 twice."""
    manifest = write_output(tmp_path, 0, 10, 8, 10)  # shards [0, 8) and [8, 10), checksums right
    write_manifest(tmp_path, {**manifest, "rows_per_shard": 4})
    with pytest.raises(
        EncodingsError,
        match=r"shard 0 is shard-00000.npz with rows \[0, 8\), expected shard-00000.npz with rows \[0, 4\)",
    ):
        read_encodings(tmp_path)


def test_a_manifest_listing_shards_under_each_others_file_names_is_refused_though_they_read_whole(
    tmp_path: Path,
) -> None:
    """Each shard checks out, but a resume writes shard N to shard-0000N.npz: over another shard's file."""
    manifest = write_output(tmp_path, 0, 10, 4, 10)
    (tmp_path / "shard-00001.npz").rename(tmp_path / "swapped")
    (tmp_path / "shard-00002.npz").rename(tmp_path / "shard-00001.npz")
    (tmp_path / "swapped").rename(tmp_path / "shard-00002.npz")
    first, second, third = manifest["shards"]
    shards = [first, {**second, "file": third["file"]}, {**third, "file": second["file"]}]
    write_manifest(tmp_path, {**manifest, "shards": shards})
    with pytest.raises(
        EncodingsError,
        match=r"shard 1 is shard-00002.npz with rows \[4, 8\), expected shard-00001.npz with rows \[4, 8\)",
    ):
        read_encodings(tmp_path)


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_an_output_of_no_rows_reads_as_zero_rows_of_its_models_width(tmp_path: Path, kind: str) -> None:
    """An input of no rows: arrays that stack with those of any output of the model, and an AE's None."""
    manifest = write_output(tmp_path, 0, 0, 4, 0)
    write_manifest(tmp_path, {**manifest, "model": {**MODEL, "kind": kind, "latent_dim": 3}})
    index, mean, log_var = read_encodings(tmp_path)
    assert (index.shape, index.dtype.str) == ((0,), "<i8")
    assert (mean.shape, mean.dtype.str) == ((0, 3), "<f4")
    if kind == "vae":
        assert log_var is not None
        assert (log_var.shape, log_var.dtype.str) == ((0, 3), "<f4")
    else:
        assert log_var is None


def test_a_manifest_missing_a_field_of_its_shard_list_is_refused_as_malformed(tmp_path: Path) -> None:
    manifest = write_output(tmp_path, 0, 10, 4, 10)
    del manifest["rows_per_shard"]
    write_manifest(tmp_path, manifest)
    with pytest.raises(
        EncodingsError, match=r"manifest.json: a malformed manifest \(KeyError: 'rows_per_shard'\)"
    ):
        read_encodings(tmp_path)


@pytest.mark.parametrize(
    ("remove", "field"),
    [
        (lambda manifest: manifest.pop("rows"), "rows"),
        (lambda manifest: manifest["input"].pop("sha256"), "input.sha256"),
        (lambda manifest: manifest["model"].pop("encoder_sha256"), "model.encoder_sha256"),
        (lambda manifest: manifest["model"].pop("kind"), "model.kind"),
        (lambda manifest: manifest["shards"][1].pop("sha256"), "shards[1].sha256"),
    ],
)
def test_a_manifest_missing_a_field_that_reading_or_resuming_needs_is_refused_naming_it(
    tmp_path: Path, remove: Callable[[dict[str, Any]], object], field: str
) -> None:
    write_output(tmp_path, 0, 10, 4, 10)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    remove(manifest)
    write_manifest(tmp_path, manifest)
    with pytest.raises(
        EncodingsError, match=rf"manifest.json: a malformed manifest \(no {re.escape(field)}\)"
    ):
        read_encodings(tmp_path)


def test_read_encodings_detects_a_corrupt_shard(tmp_path: Path) -> None:
    write_output(tmp_path, 0, 10, 4, 10)
    shard = tmp_path / "shard-00001.npz"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(EncodingsError, match=r"shard-00001.npz: sha256 differs"):
        read_encodings(tmp_path)


def test_read_encodings_refuses_a_directory_that_is_no_output(tmp_path: Path) -> None:
    with pytest.raises(EncodingsError, match=r"no manifest.json"):
        read_encodings(tmp_path)


def write_parts(directory: Path, total: int, parts: int) -> None:
    for part in range(parts):
        r = split_rows(total, parts, part)
        write_output(
            directory / part_directory_name(part, parts), r.start, r.stop, 3, total, part=part, parts=parts
        )


def test_the_parts_of_a_split_job_read_as_one_output(tmp_path: Path) -> None:
    write_parts(tmp_path, 10, 3)
    index, mean, _ = read_encodings(tmp_path)
    np.testing.assert_array_equal(index, np.arange(10))
    np.testing.assert_array_equal(mean, rows(0, 10)[1])
    # The merged manifest lists the parts' shards, so readers that only know manifests see one output.
    write_manifest(tmp_path, merged_manifest(tmp_path))
    assert json.loads((tmp_path / MANIFEST).read_text())["merged_from"][0] == "part-00000-of-00003"
    np.testing.assert_array_equal(read_encodings(tmp_path).input_rows, np.arange(10))


def test_a_missing_part_is_named(tmp_path: Path) -> None:
    write_parts(tmp_path, 10, 3)
    for file in (tmp_path / "part-00001-of-00003").iterdir():
        file.unlink()
    (tmp_path / "part-00001-of-00003").rmdir()
    with pytest.raises(EncodingsError, match=r"1 of 3 parts missing: part-00001-of-00003$"):
        read_encodings(tmp_path)


def test_a_part_whose_name_claims_a_billion_parts_is_answered_by_a_count_not_a_list_of_them(
    tmp_path: Path,
) -> None:
    """A list of a billion names would take gigabytes before the error could say anything."""
    write_parts(tmp_path, 10, 3)
    (tmp_path / "part-00001-of-00003").rename(tmp_path / "part-00001-of-1000000000")
    for part in (0, 2):
        (tmp_path / f"part-0000{part}-of-00003").rename(tmp_path / f"part-0000{part}-of-1000000000")
    with pytest.raises(
        EncodingsError,
        match=r"999999997 of 1000000000 parts missing: part-00003-of-1000000000, .*, "
        r"part-00007-of-1000000000 and 999999992 more$",
    ):
        read_encodings(tmp_path)


def test_parts_from_different_encoders_are_not_joined(tmp_path: Path) -> None:
    write_parts(tmp_path, 10, 2)
    part = tmp_path / "part-00001-of-00002"
    manifest = json.loads((part / MANIFEST).read_text())
    manifest["model"] = {**MODEL, "version": "2", "encoder_sha256": "ef" * 32}
    write_manifest(part, manifest)
    with pytest.raises(EncodingsError, match="part-00001-of-00002: its encoder differs"):
        read_encodings(tmp_path)


def test_parts_encoded_by_two_versions_that_share_the_encoder_are_joined(tmp_path: Path) -> None:
    """A version that changed only the decoder gives the same encodings: a part resumed after it fits."""
    write_parts(tmp_path, 10, 2)
    part = tmp_path / "part-00001-of-00002"
    manifest = json.loads((part / MANIFEST).read_text())
    write_manifest(part, {**manifest, "model": {**MODEL, "version": "2-new-decoder"}})
    assert [entry["file"] for entry in merged_manifest(tmp_path)["shards"]][-1].startswith(part.name)
    np.testing.assert_array_equal(read_encodings(tmp_path).input_rows, np.arange(10))


def test_the_latent_space_is_the_encoder_its_width_and_the_kind_of_model() -> None:
    assert same_latent_space(MODEL, {**MODEL, "name": "renamed", "version": "2"})
    for key, other in [("encoder_sha256", "ef" * 32), ("latent_dim", 3), ("kind", "ae")]:
        assert not same_latent_space(MODEL, {**MODEL, key: other}), key


def test_parts_that_read_the_input_from_different_paths_are_joined(tmp_path: Path) -> None:
    write_parts(tmp_path, 10, 2)
    part = tmp_path / "part-00001-of-00002"
    manifest = json.loads((part / MANIFEST).read_text())
    manifest["input"] = {**manifest["input"], "path": "/mnt/elsewhere/input.npy"}
    write_manifest(part, manifest)
    np.testing.assert_array_equal(read_encodings(tmp_path).input_rows, np.arange(10))
    manifest["input"]["sha256"] = "0" * 64  # another file's content is another input
    write_manifest(part, manifest)
    with pytest.raises(EncodingsError, match="part-00001-of-00002: its input differs"):
        read_encodings(tmp_path)


def test_an_input_is_the_same_by_its_content_row_names_and_rejects_wherever_it_lies() -> None:
    """A folder of PNGs whose files were renamed keeps its bytes but not its rows' names."""
    record = {
        "path": "/data/digits",
        "sha256": "01" * 32,
        "rows": 10,
        "dtype": "uint8",
        "names_sha256": "02" * 32,
        "rejected": [],
    }
    assert same_input(record, {**record, "path": "/mnt/elsewhere/digits"})
    for key, other in [
        ("sha256", "03" * 32),
        ("rows", 11),
        ("dtype", "float32"),
        ("names_sha256", "04" * 32),
        ("rejected", [["bad.png", "not a PNG"]]),
    ]:
        assert not same_input(record, {**record, key: other}), key


def test_a_split_output_with_an_unfinished_part_is_refused_not_read_short(tmp_path: Path) -> None:
    write_parts(tmp_path, 10, 2)
    part = tmp_path / "part-00001-of-00002"
    manifest = json.loads((part / MANIFEST).read_text())
    write_manifest(part, {**manifest, "shards": manifest["shards"][:1], "complete": False})
    with pytest.raises(EncodingsError, match="part-00001-of-00002: unfinished"):
        read_encodings(tmp_path)


def test_parts_of_two_different_splits_are_not_joined(tmp_path: Path) -> None:
    write_parts(tmp_path, 10, 2)
    write_parts(tmp_path, 10, 3)
    with pytest.raises(EncodingsError, match=r"split in different ways: \[2, 3\]"):
        read_encodings(tmp_path)


def test_a_split_in_100000_parts_is_seen_though_its_folders_take_six_digits(tmp_path: Path) -> None:
    """A Kubernetes Indexed Job may have 100,000 completions: `part-00000-of-100000`."""
    write_output(tmp_path / part_directory_name(0, 100_000), 0, 1, 3, 100_000, part=0, parts=100_000)
    write_parts(tmp_path, 10, 2)
    with pytest.raises(EncodingsError, match=r"split in different ways: \[2, 100000\]"):
        read_encodings(tmp_path)


def test_a_manifest_of_another_format_version_is_refused(tmp_path: Path) -> None:
    manifest = write_output(tmp_path, 0, 10, 4, 10)
    write_manifest(tmp_path, {**manifest, "format_version": 2})
    with pytest.raises(EncodingsError, match="format_version 2; this reader knows 1"):
        read_encodings(tmp_path)


def test_a_shard_whose_rows_differ_from_its_manifest_entry_is_refused(tmp_path: Path) -> None:
    manifest = write_output(tmp_path, 0, 10, 4, 10)
    # A well-formed shard with a valid checksum, but of rows 100-103.
    index = np.arange(100, 104, dtype=np.int64)
    data = shard_bytes(index, np.zeros((4, 2), np.float32), np.zeros((4, 2), np.float32))
    (tmp_path / "shard-00001.npz").write_bytes(data)
    manifest["shards"][1]["sha256"] = sha256_bytes(data)
    write_manifest(tmp_path, manifest)
    with pytest.raises(EncodingsError, match=r"rows differ from the manifest's \[4, 8\)"):
        read_encodings(tmp_path)


def test_an_unsplit_output_with_parts_beside_it_is_refused(tmp_path: Path) -> None:
    write_output(tmp_path, 0, 10, 4, 10)
    write_parts(tmp_path, 10, 2)
    with pytest.raises(EncodingsError, match="holds both an unsplit job's"):
        read_encodings(tmp_path)


def test_a_merged_manifest_is_not_read_once_its_parts_are_those_of_another_split(tmp_path: Path) -> None:
    """Its shards' checksums would still match, and the old job's rows come back as if they were new."""
    write_parts(tmp_path, 10, 3)
    write_manifest(tmp_path, merged_manifest(tmp_path))
    write_parts(tmp_path, 10, 2)
    with pytest.raises(EncodingsError, match=r"split in different ways: \[2, 3\]"):
        read_encodings(tmp_path)
    for part in range(3):
        shutil.rmtree(tmp_path / part_directory_name(part, 3))
    with pytest.raises(
        EncodingsError,
        match=r"its manifest.json joins 3 parts, but the folder holds 2: run vae-encode-job merge",
    ):
        read_encodings(tmp_path)


def rewrite_part(directory: Path, part: int, parts: int, start: int, stop: int, total: int) -> None:
    """Part `part` of `parts` written again, a whole output of its own, for rows [start, stop) of `total`."""
    folder = directory / part_directory_name(part, parts)
    shutil.rmtree(folder)
    write_output(folder, start, stop, 3, total, part=part, parts=parts)


@pytest.mark.parametrize("start", [6, 4], ids=["a gap", "an overlap"])
def test_parts_that_do_not_follow_on_from_each_other_are_not_joined_naming_the_row(
    tmp_path: Path, start: int
) -> None:
    """Each part is a sound output on its own; joined, they would leave row 5 out or hold row 4 twice."""
    write_parts(tmp_path, 10, 2)  # rows [0, 5) and [5, 10)
    rewrite_part(tmp_path, 1, 2, start, 10, 10)
    message = rf"^{re.escape(str(tmp_path))}/part-00001-of-00002: starts at row {start}, expected 5$"
    with pytest.raises(EncodingsError, match=message):
        merged_manifest(tmp_path)
    with pytest.raises(EncodingsError, match=message):
        read_encodings(tmp_path)


def test_parts_that_stop_short_of_the_inputs_last_row_are_not_joined(tmp_path: Path) -> None:
    """Every part complete and in line, but the last one ends at row 9 of an input of 10 rows."""
    write_parts(tmp_path, 10, 2)
    rewrite_part(tmp_path, 1, 2, 5, 9, 10)
    message = rf"^{re.escape(str(tmp_path))}: the parts end at row 9 of 10$"
    with pytest.raises(EncodingsError, match=message):
        merged_manifest(tmp_path)
    with pytest.raises(EncodingsError, match=message):
        read_encodings(tmp_path)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda path: path.write_text('{"format_version": 1, "shards": ['), "Expecting value"),
        (lambda path: (path.unlink(), path.mkdir()), "Is a directory"),
    ],
    ids=["torn JSON", "a folder"],
)
def test_a_part_whose_manifest_cannot_be_read_as_json_is_named_with_the_reason(
    tmp_path: Path, spoil: Callable[[Path], object], reason: str
) -> None:
    write_parts(tmp_path, 10, 2)
    manifest = tmp_path / "part-00001-of-00002" / MANIFEST
    spoil(manifest)
    with pytest.raises(
        EncodingsError, match=rf"^{re.escape(str(manifest))}: not a readable JSON manifest \("
    ) as refused:
        merged_manifest(tmp_path)
    assert reason in str(refused.value)


def test_a_shard_the_manifest_lists_that_is_gone_is_named_as_unreadable(tmp_path: Path) -> None:
    write_parts(tmp_path, 10, 2)
    shard = tmp_path / "part-00001-of-00002" / "shard-00001.npz"
    shard.unlink()
    with pytest.raises(
        EncodingsError,
        match=rf"^{re.escape(str(shard))}: listed in the manifest but unreadable \(.*No such file",
    ):
        read_encodings(tmp_path)


def test_a_folder_with_no_manifest_and_no_parts_is_refused_as_no_output(tmp_path: Path) -> None:
    """Names close to a part's are not parts: a file of a part's name, or a folder named otherwise."""
    (tmp_path / "part-00000-of-00001").write_text("a file, not a part")
    (tmp_path / "part-0-of-1").mkdir()
    message = rf"^{re.escape(str(tmp_path))}: no manifest.json and no part-\*-of-\* directories$"
    with pytest.raises(EncodingsError, match=message):
        merged_manifest(tmp_path)
    with pytest.raises(EncodingsError, match=message):
        read_encodings(tmp_path)
