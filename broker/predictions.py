"""Parse, check, pool and store the predictions of a sharded evaluation.

A shard job writes `PREDICTIONS_ARTIFACT`: a JSON list of records with the keys set,
experiment, mu_hat, delta_mu_hat, p16 and p84. `parse_shard` turns those bytes into a
`Predictions` of NumPy arrays and checks that the shard's rectangle of the
(set, experiment) grid is covered exactly once. `pool` concatenates the shards of an
evaluation, and the pooled arrays are stored either as the JSON file that a scoring
program reads or as a compact .npz file.

A record is valid under the rules of the example challenge's scoring program: set
and experiment are JSON integers (not booleans), and mu_hat, delta_mu_hat, p16 and
p84 are finite JSON numbers. Other keys are ignored. p16 > p84 is accepted because
the metric uses |p84 - p16|.

Every function blocks. Callers on an event loop run them through `asyncio.to_thread`.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fairu.files import write_atomic
from fairu.protocol.errors import FairuError
from fairu.protocol.evaluation import MAX_EXPERIMENTS_PER_SET, MAX_SETS

logger = logging.getLogger(__name__)

INDEX_KEYS = ("set", "experiment")
VALUE_KEYS = ("mu_hat", "delta_mu_hat", "p16", "p84")
RECORD_KEYS = INDEX_KEYS + VALUE_KEYS

# Bounds on one predictions body. A record written by the example's ingestion
# program takes about 150 bytes, so MAX_RECORD_BYTES leaves room for indentation
# and extra keys.
MAX_RECORDS = 1_000_000
MAX_RECORD_BYTES = 512
# NOTE: json.loads needs about 4 times the body size in memory for records like the
# example's (555 bytes per record measured), and up to 10 times for a body of bare
# numbers, so a body at this limit can take 2.5 GB while it is parsed.
MAX_PREDICTIONS_BYTES = 256 * 1024 * 1024

# How many offending indices an error message lists for each kind of defect.
EXAMPLES_IN_MESSAGE = 5

NPZ_FORMAT = 1

_INDEX_LIMITS = {"set": MAX_SETS, "experiment": MAX_EXPERIMENTS_PER_SET}


class PredictionsError(FairuError):
    """Invalid predictions; the message names the offending record or indices."""


class PredictionsTooLargeError(PredictionsError):
    """A predictions body exceeds the byte or record limit."""


class IncompleteShardError(PredictionsError):
    """A shard's predictions do not cover its rectangle exactly once.

    `missing`, `duplicated` and `outside` are (N, 2) int64 arrays of
    (set, experiment) pairs: pairs of the rectangle with no record, pairs with more
    than one record, and records outside the rectangle (each record once).
    """

    def __init__(
        self,
        message: str,
        *,
        shard: int,
        missing: np.ndarray,
        duplicated: np.ndarray,
        outside: np.ndarray,
    ) -> None:
        super().__init__(message)
        self.shard = shard
        self.missing = missing
        self.duplicated = duplicated
        self.outside = outside


class ShardRectangle(Protocol):
    """The part of the (set, experiment) grid that one shard covers.

    `fairu.protocol.evaluation.ShardStatus` has these attributes.
    """

    @property
    def index(self) -> int: ...
    @property
    def first_set(self) -> int: ...
    @property
    def sets(self) -> int: ...
    @property
    def first_experiment(self) -> int: ...
    @property
    def experiments(self) -> int: ...


@dataclass(frozen=True, eq=False)
class Predictions:
    """Per-experiment predictions as parallel 1-D arrays, one entry per record.

    set and experiment are int64, the other fields float64. The constructor checks
    dtypes and lengths only. The parsers and readers of this module also check that
    indices are in range and values finite.
    """

    set: np.ndarray
    experiment: np.ndarray
    mu_hat: np.ndarray
    delta_mu_hat: np.ndarray
    p16: np.ndarray
    p84: np.ndarray

    def __post_init__(self) -> None:
        length = None
        for key in RECORD_KEYS:
            array = getattr(self, key)
            dtype = np.int64 if key in INDEX_KEYS else np.float64
            if not isinstance(array, np.ndarray) or array.dtype != dtype:
                raise TypeError(
                    f"Predictions.{key} must be a NumPy {dtype.__name__} array"
                )
            if array.ndim != 1:
                raise ValueError(
                    f"Predictions.{key} must be 1-D, got shape {array.shape}"
                )
            if length is None:
                length = array.shape[0]
            elif array.shape[0] != length:
                raise ValueError(
                    f"Predictions.{key} has {array.shape[0]} entries, "
                    f"Predictions.set has {length}"
                )

    def __len__(self) -> int:
        return int(self.set.shape[0])

    def take(self, index: np.ndarray) -> Predictions:
        """Return the records at `index` (an integer or boolean array), in its order."""
        return Predictions(**{key: getattr(self, key)[index] for key in RECORD_KEYS})

    def sorted(self) -> Predictions:
        """Return the records ordered by set, then experiment."""
        return self.take(np.lexsort((self.experiment, self.set)))

    def to_records(self) -> list[dict[str, Any]]:
        """Return the records as dicts with Python ints and floats, in array order."""
        columns = [getattr(self, key).tolist() for key in RECORD_KEYS]
        rows = zip(*columns, strict=True)
        return [dict(zip(RECORD_KEYS, row, strict=True)) for row in rows]


def empty_predictions() -> Predictions:
    """Return predictions with no records."""
    return Predictions(
        **{
            key: np.empty(0, dtype=np.int64 if key in INDEX_KEYS else np.float64)
            for key in RECORD_KEYS
        }
    )


# --- parsing ------------------------------------------------------------------------


def parse_predictions(
    data: bytes,
    *,
    source: str = "predictions",
    max_bytes: int = MAX_PREDICTIONS_BYTES,
    max_records: int = MAX_RECORDS,
) -> Predictions:
    """Parse a JSON list of prediction records into arrays, checking every record.

    Indices must lie in 0 .. MAX_SETS - 1 and 0 .. MAX_EXPERIMENTS_PER_SET - 1.
    Repeated pairs are not checked here (see `check_shard` and `check_unique`).
    `source` names the body in error messages, such as "shard 3". Raises
    PredictionsTooLargeError over the limits and PredictionsError for anything else.
    """
    records = _load_records(data, source, max_bytes, max_records)
    columns = {key: _index_column(records, key, source) for key in INDEX_KEYS}
    for key in VALUE_KEYS:
        columns[key] = _value_column(records, key, source)
    return Predictions(**columns)


def _load_records(
    data: bytes, source: str, max_bytes: int, max_records: int
) -> list[dict[str, Any]]:
    if len(data) > max_bytes:
        raise PredictionsTooLargeError(
            f"{source} is {len(data)} bytes; the limit is {max_bytes} bytes. "
            "Split the evaluation into smaller shards."
        )
    # Every record is a JSON object, so counting "{" bounds the records before
    # json.loads builds them.
    objects = data.count(b"{")
    if objects > max_records:
        raise PredictionsTooLargeError(
            f"{source} contains {objects} '{{' characters, so it may hold more than "
            f"the limit of {max_records} records. Split the evaluation into smaller "
            "shards."
        )
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PredictionsError(f"{source} is not UTF-8: {exc}") from None
    except RecursionError:
        raise PredictionsError(
            f"{source} is not valid JSON: nested too deeply"
        ) from None
    except ValueError as exc:
        raise PredictionsError(f"{source} is not valid JSON: {exc}") from None

    if not isinstance(records, list) or not records:
        raise PredictionsError(
            f"{source} must contain a non-empty JSON list of records with the keys "
            f"{', '.join(RECORD_KEYS)}"
        )
    if len(records) > max_records:
        raise PredictionsTooLargeError(
            f"{source} has {len(records)} records; the limit is {max_records}"
        )
    if set(map(type, records)) != {dict}:
        position = next(
            i for i, record in enumerate(records) if type(record) is not dict
        )
        raise PredictionsError(f"record {position} of {source} is not a JSON object")
    return records


def _column(records: list[dict[str, Any]], key: str) -> list[Any]:
    # map() keeps the per-record work in C; a missing key gives None.
    return list(map(dict.get, records, repeat(key)))


def _index_column(records: list[dict[str, Any]], key: str, source: str) -> np.ndarray:
    column = _column(records, key)
    if set(map(type, column)) != {int}:
        position = next(i for i, value in enumerate(column) if type(value) is not int)
        raise PredictionsError(
            f"record {position} of {source}: {key} {_show(column[position])} "
            "is missing or not an integer"
        )

    limit = _INDEX_LIMITS[key]
    try:
        array = np.array(column, dtype=np.int64)
    except OverflowError:
        array = None
    if array is None:
        position = next(i for i, value in enumerate(column) if not 0 <= value < limit)
    else:
        outside = np.flatnonzero((array < 0) | (array >= limit))
        if outside.size == 0:
            return array
        position = int(outside[0])
    raise PredictionsError(
        f"record {position} of {source}: {key} {_show(column[position])} "
        f"is not in 0 .. {limit - 1}"
    )


def _value_column(records: list[dict[str, Any]], key: str, source: str) -> np.ndarray:
    column = _column(records, key)
    if not set(map(type, column)) <= {int, float}:
        position = next(
            i for i, value in enumerate(column) if type(value) not in (int, float)
        )
        raise PredictionsError(
            f"record {position} of {source}: {key} is missing or not a number "
            f"({_show(column[position])})"
        )

    try:
        array = np.array(column, dtype=np.float64)
    except OverflowError:
        # An integer beyond the float range, which counts as not finite.
        array = None
    if array is None:
        position = next(i for i, value in enumerate(column) if not _fits_float(value))
    else:
        infinite = np.flatnonzero(~np.isfinite(array))
        if infinite.size == 0:
            return array
        position = int(infinite[0])
    raise PredictionsError(
        f"record {position} of {source}: {key} {_show(column[position])} is not finite"
    )


def _fits_float(value: float) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- completeness -------------------------------------------------------------------


def check_shard(
    predictions: Predictions, shard: ShardRectangle, *, max_records: int = MAX_RECORDS
) -> None:
    """Check that the predictions cover the shard's rectangle, each pair exactly once.

    Raises IncompleteShardError naming the counts and the first missing, duplicated
    and outside pairs, or PredictionsTooLargeError when the rectangle itself has
    more than max_records pairs.
    """
    check_rectangle(shard, max_records)
    cells = shard.sets * shard.experiments
    rows = predictions.set - shard.first_set
    columns = predictions.experiment - shard.first_experiment
    inside = (rows >= 0) & (rows < shard.sets) & (columns >= 0)
    inside &= columns < shard.experiments
    counts = np.bincount(
        rows[inside] * shard.experiments + columns[inside], minlength=cells
    )

    missing = _cells_to_pairs(np.flatnonzero(counts == 0), shard)
    duplicated_cells = np.flatnonzero(counts > 1)
    duplicated = _cells_to_pairs(duplicated_cells, shard)
    outside_at = np.flatnonzero(~inside)
    outside = np.column_stack(
        (predictions.set[outside_at], predictions.experiment[outside_at])
    )
    if not (missing.size or duplicated.size or outside.size):
        return

    parts = []
    if missing.size:
        parts.append(f"{len(missing)} missing ({_list_pairs(missing)})")
    if duplicated.size:
        times = counts[duplicated_cells[:EXAMPLES_IN_MESSAGE]].tolist()
        parts.append(f"{len(duplicated)} duplicated ({_list_pairs(duplicated, times)})")
    if outside.size:
        parts.append(f"{len(outside)} outside the shard ({_list_pairs(outside)})")
    last_set = shard.first_set + shard.sets - 1
    last_experiment = shard.first_experiment + shard.experiments - 1
    message = (
        f"shard {shard.index}: {', '.join(parts)}; the shard must predict each "
        f"experiment {shard.first_experiment} .. {last_experiment} of each set "
        f"{shard.first_set} .. {last_set} exactly once"
    )
    raise IncompleteShardError(
        message,
        shard=shard.index,
        missing=missing,
        duplicated=duplicated,
        outside=outside,
    )


def check_rectangle(shard: ShardRectangle, max_records: int = MAX_RECORDS) -> None:
    """Raise PredictionsTooLargeError when the shard has more than max_records cells."""
    cells = shard.sets * shard.experiments
    if cells > max_records:
        raise PredictionsTooLargeError(
            f"shard {shard.index} covers {cells} experiments; the limit is "
            f"{max_records} per shard. Split the evaluation into smaller shards."
        )


def _cells_to_pairs(cells: np.ndarray, shard: ShardRectangle) -> np.ndarray:
    rows, columns = np.divmod(cells, shard.experiments)
    return np.column_stack((rows + shard.first_set, columns + shard.first_experiment))


def _list_pairs(pairs: np.ndarray, times: Sequence[int] | None = None) -> str:
    descriptions = []
    for position, (set_index, experiment) in enumerate(
        pairs[:EXAMPLES_IN_MESSAGE].tolist()
    ):
        text = f"set {set_index} experiment {experiment}"
        if times is not None:
            text += f": {times[position]} records"
        descriptions.append(text)
    if len(pairs) > EXAMPLES_IN_MESSAGE:
        descriptions.append("...")
    return ", ".join(descriptions)


def parse_shard(
    data: bytes,
    shard: ShardRectangle,
    *,
    max_bytes: int = MAX_PREDICTIONS_BYTES,
    max_records: int = MAX_RECORDS,
) -> Predictions:
    """Parse one shard's predictions body and check it against the shard's rectangle.

    Combines `parse_predictions` and `check_shard`, and raises their errors. The
    limits shrink to the rectangle: at most twice its experiments as records, so
    that every record may appear twice in the error, and MAX_RECORD_BYTES per
    record.
    """
    check_rectangle(shard, max_records)
    records_limit = min(max_records, 2 * shard.sets * shard.experiments)
    predictions = parse_predictions(
        data,
        source=f"shard {shard.index}",
        max_bytes=min(max_bytes, MAX_RECORD_BYTES * records_limit),
        max_records=records_limit,
    )
    check_shard(predictions, shard, max_records=max_records)
    return predictions


def check_unique(predictions: Predictions, *, source: str = "predictions") -> None:
    """Raise PredictionsError when a (set, experiment) pair appears more than once."""
    keys = predictions.set * MAX_EXPERIMENTS_PER_SET + predictions.experiment
    ordered = np.sort(keys)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if repeated.size == 0:
        return
    pairs = np.column_stack(np.divmod(repeated, MAX_EXPERIMENTS_PER_SET))
    raise PredictionsError(
        f"{source}: {len(pairs)} (set, experiment) pairs appear more than once "
        f"({_list_pairs(pairs)})"
    )


def first_out_of_range(array: np.ndarray, limit: int) -> int | None:
    """Return the position of the first value of `array` outside 0 .. limit - 1."""
    outside = np.flatnonzero((array < 0) | (array >= limit))
    return int(outside[0]) if outside.size else None


def check_range(
    predictions: Predictions,
    num_sets: int,
    experiments_per_set: int,
    *,
    source: str = "predictions",
) -> None:
    """Raise PredictionsError when an index lies outside the evaluation's grid."""
    for key, limit in (("set", num_sets), ("experiment", experiments_per_set)):
        array = getattr(predictions, key)
        position = first_out_of_range(array, limit)
        if position is not None:
            raise PredictionsError(
                f"record {position} of {source}: {key} {int(array[position])} is "
                f"not in 0 .. {limit - 1}"
            )


# --- pooling ------------------------------------------------------------------------


def pool(parts: Iterable[Predictions], *, unique: bool = True) -> Predictions:
    """Concatenate the predictions of several shards, in the order given.

    With `unique`, raises PredictionsError when two records share a
    (set, experiment) pair, as when two shards overlap.
    """
    parts = list(parts)
    if not parts:
        return empty_predictions()
    pooled = Predictions(
        **{
            key: np.concatenate([getattr(part, key) for part in parts])
            for key in RECORD_KEYS
        }
    )
    if unique:
        check_unique(pooled, source="pooled predictions")
    return pooled


# --- files --------------------------------------------------------------------------

_RECORD_FORMAT = (
    '{{"set": {}, "experiment": {}, "mu_hat": {!r}, "delta_mu_hat": {!r}, '
    '"p16": {!r}, "p84": {!r}}}'
)


def encode_predictions_json(predictions: Predictions) -> bytes:
    """Return the records as a JSON list, one record a line, as ingestion writes them.

    Floats are written with repr, which reads back as the same float64.
    """
    columns = [getattr(predictions, key).tolist() for key in RECORD_KEYS]
    lines = list(map(_RECORD_FORMAT.format, *columns))
    if not lines:
        return b"[]\n"
    return ("[\n" + ",\n".join(lines) + "\n]\n").encode("ascii")


def write_predictions_json(path: Path, predictions: Predictions) -> Path:
    """Write the records to `path` as `encode_predictions_json` does, atomically.

    The file is the predictions.json that a scoring program reads. Returns `path`.
    """
    write_atomic(Path(path), encode_predictions_json(predictions))
    logger.info("wrote %d prediction records to %s", len(predictions), path)
    return Path(path)


def read_predictions_json(
    path: Path,
    *,
    num_sets: int | None = None,
    experiments_per_set: int | None = None,
    max_bytes: int = MAX_PREDICTIONS_BYTES,
    max_records: int = MAX_RECORDS,
) -> Predictions:
    """Read a predictions.json file, checking records, repeats and, if given, the grid.

    Raises PredictionsError, also when the file is missing or unreadable.
    """
    path = Path(path)
    data = _read_bounded(path, max_bytes)
    source = str(path)
    predictions = parse_predictions(
        data, source=source, max_bytes=max_bytes, max_records=max_records
    )
    _check_grid(predictions, num_sets, experiments_per_set, source)
    return predictions


def write_predictions_npz(path: Path, predictions: Predictions) -> Path:
    """Write the arrays to an uncompressed .npz file at `path`, atomically.

    Holds one array per record key and `format` (an int64 scalar, now 1).
    Returns `path`.
    """
    buffer = io.BytesIO()
    arrays = {key: getattr(predictions, key) for key in RECORD_KEYS}
    np.savez(buffer, format=np.int64(NPZ_FORMAT), **arrays)
    write_atomic(Path(path), buffer.getvalue())
    logger.info("wrote %d prediction records to %s", len(predictions), path)
    return Path(path)


def read_predictions_npz(
    path: Path,
    *,
    num_sets: int | None = None,
    experiments_per_set: int | None = None,
    max_records: int = MAX_RECORDS,
) -> Predictions:
    """Read a file that `write_predictions_npz` wrote, checking it as the JSON reader.

    Raises PredictionsError for a missing, foreign or invalid file.
    """
    path = Path(path)
    source = str(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            expected = {"format", *RECORD_KEYS}
            if names != expected:
                raise PredictionsError(
                    f"{source} contains the arrays {sorted(names)}, expected "
                    f"{sorted(expected)}; it was not written by write_predictions_npz"
                )
            version = archive["format"]
            if version.shape != () or int(version) != NPZ_FORMAT:
                raise PredictionsError(
                    f"{source} has format {version!r}; this reader reads format "
                    f"{NPZ_FORMAT}"
                )
            arrays = {key: archive[key] for key in RECORD_KEYS}
    except (OSError, ValueError) as exc:
        raise PredictionsError(f"failed to read {source}: {exc}") from None

    try:
        predictions = Predictions(**arrays)
    except (TypeError, ValueError) as exc:
        raise PredictionsError(f"{source} is invalid: {exc}") from None
    if len(predictions) > max_records:
        raise PredictionsTooLargeError(
            f"{source} has {len(predictions)} records; the limit is {max_records}"
        )
    for key in VALUE_KEYS:
        infinite = np.flatnonzero(~np.isfinite(getattr(predictions, key)))
        if infinite.size:
            raise PredictionsError(
                f"record {int(infinite[0])} of {source}: {key} is not finite"
            )
    _check_grid(predictions, num_sets, experiments_per_set, source)
    return predictions


def _check_grid(
    predictions: Predictions,
    num_sets: int | None,
    experiments_per_set: int | None,
    source: str,
) -> None:
    if num_sets is None:
        num_sets = MAX_SETS
    if experiments_per_set is None:
        experiments_per_set = MAX_EXPERIMENTS_PER_SET
    check_range(predictions, num_sets, experiments_per_set, source=source)
    check_unique(predictions, source=source)


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise PredictionsError(f"failed to read {path}: {exc}") from None
    if len(data) > max_bytes:
        raise PredictionsTooLargeError(
            f"{path} is larger than the limit of {max_bytes} bytes"
        )
    return data
