"""The output of `vae-encode-job` on disk, written crash-safe and read back with checksums.

One job's output directory:

    manifest.json       what was encoded (input, model, row range) and the list of finished shards
    shard-00000.npz     `index` int64 [n] (input row numbers), `mean` and `log_var` float32 [n,D]
    shard-00001.npz     ...
    inputs.txt          for a folder of PNGs: the file name of each input row, in row order
    .lock               held by the job writing the directory, so that no second one writes beside it
    rejected.txt        for a folder of PNGs read with --skip-bad: each file left out, and why

The manifest is the commit point: a shard exists once the manifest lists it. Every file is written
to a temporary name, fsynced, renamed over its final name, and the directory fsynced, so a crash at
any moment leaves either the old or the new version of each file and never a torn one. The .npz
files are written with fixed zip timestamps, so the same rows give the same bytes on every run.

A job split with `--num-shards N` writes `part-00000-of-0000N/` ... under the output directory; the
reader joins complete parts, and `vae-encode-job merge` writes a manifest that lists them as one.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"  # held by the one job (or merge) writing the directory
INPUTS_LIST = "inputs.txt"
REJECTED_LIST = "rejected.txt"
_PART_NAME = re.compile(r"^part-(\d{5,})-of-(\d{5,})$")  # 100000 parts: six digits
# The missing parts an error names before it counts the rest.
MISSING_PARTS_NAMED = 5
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class EncodingsError(ValueError):
    """An output directory that is incomplete, inconsistent or corrupt; the message says which file."""


class Encodings(NamedTuple):
    """Encoded rows in input order: the input row numbers int64 [N], `mean` and `log_var` float32 [N,D].

    It unpacks as `index, mean, log_var = read_encodings(directory)`; an AE has no log_var (None).
    """

    input_rows: npt.NDArray[np.int64]
    mean: npt.NDArray[np.float32]
    log_var: npt.NDArray[np.float32] | None


@dataclass(frozen=True)
class RowRange:
    """The contiguous input rows [start, stop) that part `part` of `parts` encodes."""

    part: int
    parts: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, int]:
        return {"part": self.part, "parts": self.parts, "start": self.start, "stop": self.stop}


def split_rows(total: int, parts: int, part: int) -> RowRange:
    """Part `part` (0-based) of `total` rows cut in `parts` contiguous ranges differing by 1 row at most."""
    if parts < 1:
        raise ValueError(f"the number of shards must be at least 1, got {parts}")
    if not 0 <= part < parts:
        raise ValueError(f"the shard index must be in [0, {parts}), got {part}")
    return RowRange(part, parts, total * part // parts, total * (part + 1) // parts)


def part_directory_name(part: int, parts: int) -> str:
    return f"part-{part:05d}-of-{parts:05d}"


def shard_file_name(number: int) -> str:
    return f"shard-{number:05d}.npz"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes, before_rename: Callable[[], None] | None = None) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, whole.

    `before_rename` runs once the temporary file is durable and before it takes the final name
    (the job's fault-injection tests stop there).
    """
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:  # a full disk, a Ctrl-C: half a file helps nobody
        temporary.unlink(missing_ok=True)
        raise
    if before_rename is not None:
        before_rename()
    temporary.replace(path)
    fsync_directory(path.parent)


def create_directory(directory: Path) -> None:
    """`mkdir -p`, with each folder it creates made durable in its parent, as the files in it are."""
    missing = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    for folder in reversed(missing):
        fsync_directory(folder.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX: the directory entry lives in the directory)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def shard_bytes(
    index: npt.NDArray[np.int64], mean: npt.NDArray[np.float32], log_var: npt.NDArray[np.float32] | None
) -> bytes:
    """One shard as .npz bytes, identical for identical arrays (np.savez stamps the current time)."""
    arrays: dict[str, npt.NDArray[Any]] = {
        "index": np.ascontiguousarray(index, dtype="<i8"),
        "mean": np.ascontiguousarray(mean, dtype="<f4"),
    }
    if log_var is not None:
        arrays["log_var"] = np.ascontiguousarray(log_var, dtype="<f4")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.create_system = 3  # unix, whatever the platform, for identical bytes
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_atomic(directory / MANIFEST, manifest_bytes(manifest))


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an output directory, checked for its format version."""
    path = directory / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise EncodingsError(f"{path}: no manifest; is {directory} the output of vae-encode-job?") from None
    except (OSError, ValueError) as error:
        raise EncodingsError(f"{path}: not a readable JSON manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise EncodingsError(f"{path}: format_version {version!r}; this reader knows {FORMAT_VERSION}")
    try:
        _check_records(path, manifest)
        _check_shard_list(path, manifest)
    except EncodingsError:
        raise
    except (KeyError, TypeError, ValueError) as error:  # a field missing, or of the wrong kind
        raise EncodingsError(f"{path}: a malformed manifest ({type(error).__name__}: {error})") from error
    return manifest


# The fields that reading, resuming and merging an output rely on, beyond the shard list's own.
_INPUT_FIELDS = ("path", "rows", "sha256")
_MODEL_FIELDS = ("name", "version", "kind", "latent_dim", "encoder_sha256")


def _check_records(path: Path, manifest: dict[str, Any]) -> None:
    """Every field read later is there, so that a damaged manifest fails here, naming what it lacks."""
    missing = [
        f"{record}.{field}"
        for record, fields in (("input", _INPUT_FIELDS), ("model", _MODEL_FIELDS))
        for field in fields
        if field not in manifest[record]
    ]
    missing += ["rows"] if "rows" not in manifest else []
    missing += [f"shards[{i}].sha256" for i, entry in enumerate(manifest["shards"]) if "sha256" not in entry]
    if missing:
        raise EncodingsError(f"{path}: a malformed manifest (no {', '.join(missing)})")


def _check_shard_list(path: Path, manifest: dict[str, Any]) -> None:
    """The shards cover the range's rows in order from its start, with no gap and no overlap, and
    all of them exactly when the manifest says complete. A job's own shards are its numbered files of
    rows_per_shard rows each (the last one shorter), which is where a resume goes on from."""
    first, last = int(manifest["range"]["start"]), int(manifest["range"]["stop"])
    per_shard = int(manifest["rows_per_shard"])
    merged = "merged_from" in manifest
    row = first
    for number, entry in enumerate(manifest["shards"]):
        start, stop = int(entry["start"]), int(entry["stop"])
        expected = (row, stop) if merged else (row, min(row + per_shard, last))
        file = entry["file"] if merged else shard_file_name(number)
        if (start, stop) != expected or not start < stop <= last or entry["file"] != file:
            raise EncodingsError(
                f"{path}: shard {number} is {entry['file']} with rows [{start}, {stop}), expected {file}"
                f" with rows [{expected[0]}, {expected[1]}): the manifest was edited or is corrupt"
            )
        row = stop
    if bool(manifest["complete"]) != (row == last):
        raise EncodingsError(
            f"{path}: says complete={manifest['complete']} with rows [{first}, {row}) of [{first}, {last})"
            " listed: the manifest was edited or is corrupt"
        )


def _shard_data(directory: Path, entry: dict[str, Any]) -> bytes:
    """The bytes of a shard the manifest lists, checked against its sha256."""
    path = directory / str(entry["file"])
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EncodingsError(f"{path}: listed in the manifest but unreadable ({error})") from error
    if sha256_bytes(data) != entry["sha256"]:
        raise EncodingsError(f"{path}: sha256 differs from the manifest's: the file is corrupt")
    return data


def read_shard(directory: Path, entry: dict[str, Any]) -> Encodings:
    """One shard listed in a manifest, its checksum and row numbers verified."""
    path = directory / entry["file"]
    with np.load(io.BytesIO(_shard_data(directory, entry)), allow_pickle=False) as arrays:
        index = arrays["index"]
        mean = arrays["mean"]
        log_var = arrays["log_var"] if "log_var" in arrays.files else None
    expected = np.arange(entry["start"], entry["stop"], dtype=np.int64)
    if not np.array_equal(index, expected):
        raise EncodingsError(f"{path}: rows differ from the manifest's [{entry['start']}, {entry['stop']})")
    return Encodings(index, mean, log_var)


def verify_shards(directory: Path, manifest: dict[str, Any]) -> None:
    """Check that every shard the manifest lists is present with its checksum (used before a resume)."""
    for entry in manifest["shards"]:
        _shard_data(directory, entry)


def _concatenate(directory: Path, manifest: dict[str, Any]) -> Encodings:
    if not manifest.get("complete"):
        done = sum(entry["stop"] - entry["start"] for entry in manifest["shards"])
        raise EncodingsError(
            f"{directory}: unfinished job, {done} of {manifest['rows']} rows encoded; "
            "run the same vae-encode-job command again with --resume"
        )
    shards = [read_shard(directory, entry) for entry in manifest["shards"]]
    latent_dim = int(manifest["model"]["latent_dim"])
    if not shards:
        empty = np.zeros((0, latent_dim), np.float32)
        return Encodings(np.zeros(0, np.int64), empty, empty if manifest["model"]["kind"] == "vae" else None)
    return Encodings(
        np.concatenate([shard.input_rows for shard in shards]),
        np.concatenate([shard.mean for shard in shards]),
        concatenate_optional([shard.log_var for shard in shards]),
    )


def concatenate_optional(arrays: list[npt.NDArray[np.float32] | None]) -> npt.NDArray[np.float32] | None:
    """The arrays joined along axis 0, or None where any is None (an AE's log_var)."""
    present = [array for array in arrays if array is not None]
    return np.concatenate(present) if len(present) == len(arrays) else None


def _part_folders(directory: Path) -> dict[tuple[int, int], Path]:
    """Each `part-IIIII-of-NNNNN` folder under `directory`, by (I, N)."""
    children = directory.iterdir() if directory.is_dir() else iter([])
    return {
        (int(match[1]), int(match[2])): child
        for child in children
        if (match := _PART_NAME.match(child.name)) and child.is_dir()
    }


def split_counts(directory: Path) -> set[int]:
    """The N of every `part-IIIII-of-NNNNN` folder under `directory`: one value, unless jobs were mixed."""
    return {parts for _, parts in _part_folders(directory)}


def part_directories(directory: Path) -> list[Path]:
    """The `part-IIIII-of-NNNNN` subdirectories of a sharded job's output, checked to be all there."""
    found = _part_folders(directory)
    if not found:
        return []
    counts = {parts for _, parts in found}
    if len(counts) != 1:
        raise EncodingsError(f"{directory}: parts of jobs split in different ways: {sorted(counts)} shards")
    parts = counts.pop()
    if len(found) < parts:
        # Named, not listed: a folder's name may claim more parts than a list of names could hold.
        missing = (part_directory_name(i, parts) for i in range(parts) if (i, parts) not in found)
        first = list(itertools.islice(missing, MISSING_PARTS_NAMED))
        absent = parts - len(found)
        more = f" and {absent - len(first)} more" if absent > len(first) else ""
        raise EncodingsError(f"{directory}: {absent} of {parts} parts missing: {', '.join(first)}{more}")
    return [found[i, parts] for i in range(parts)]


def same_input(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two manifests' input records are the same input: its content, row names and rejects.
    The path may differ (a moved file, or a part run where the file is mounted elsewhere)."""
    return all(a.get(key) == b.get(key) for key in ("sha256", "rows", "dtype", "names_sha256", "rejected"))


def same_latent_space(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two manifests' model records encode into the same latent space: the same encoder graph,
    latent_dim and kind. A new decoder or version number leaves the encodings as they were."""
    return all(a.get(key) == b.get(key) for key in ("encoder_sha256", "latent_dim", "kind"))


def merged_manifest(directory: Path) -> dict[str, Any]:
    """One manifest listing the shards of every part under `directory`, after checking they fit together.

    The parts must be complete, encode the same input with the same encoder (see same_latent_space),
    and cover its rows end to end; otherwise EncodingsError says which part is off.
    """
    parts = part_directories(directory)
    if not parts:
        raise EncodingsError(f"{directory}: no {MANIFEST} and no part-*-of-* directories")
    manifests = [read_manifest(part) for part in parts]
    first = manifests[0]
    shards: list[dict[str, Any]] = []
    next_row = 0
    for part, manifest in zip(parts, manifests, strict=True):
        if not manifest.get("complete"):
            raise EncodingsError(f"{part}: unfinished; run its job again with --resume before merging")
        for key, same in (
            ("input", same_input(manifest["input"], first["input"])),
            ("encoder", same_latent_space(manifest["model"], first["model"])),
        ):
            if not same:
                raise EncodingsError(
                    f"{part}: its {key} differs from {parts[0].name}'s; the parts cannot be joined"
                )
        if manifest["range"]["start"] != next_row:
            raise EncodingsError(f"{part}: starts at row {manifest['range']['start']}, expected {next_row}")
        next_row = manifest["range"]["stop"]
        shards += [{**entry, "file": f"{part.name}/{entry['file']}"} for entry in manifest["shards"]]
    if next_row != first["input"]["rows"]:
        raise EncodingsError(f"{directory}: the parts end at row {next_row} of {first['input']['rows']}")
    return {
        **first,
        "range": {"part": 0, "parts": 1, "start": 0, "stop": next_row},
        "rows": next_row,
        "shards": shards,
        "merged_from": [part.name for part in parts],
    }


def read_encodings(directory: Path | str) -> Encodings:
    """Every encoded row of a finished `vae-encode-job` output, checksums verified, in input order.

    `directory` is one job's output, or the output of a job split with --num-shards (its parts are
    joined). Raises EncodingsError for an unfinished, inconsistent or corrupt output.

    >>> index, mean, log_var = read_encodings("encodings/")  # doctest: +SKIP
    >>> mean.shape  # (rows, latent_dim)  # doctest: +SKIP
    """
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        manifest = read_manifest(directory)
        parts = [part.name for part in part_directories(directory)]
        if "merged_from" not in manifest and parts:
            raise EncodingsError(
                f"{directory}: holds both an unsplit job's {MANIFEST} and the parts of a split job; "
                "move one of them elsewhere"
            )
        if "merged_from" in manifest and manifest["merged_from"] != parts:
            raise EncodingsError(
                f"{directory}: its {MANIFEST} joins {len(manifest['merged_from'])} parts, but the folder "
                f"holds {len(parts)}: run vae-encode-job merge --output {directory} again"
            )
        return _concatenate(directory, manifest)
    return _concatenate(directory, merged_manifest(directory))
