"""The per-run input report: how many images mining read per split, and which it skipped and why.

Every mask shard records the images it skipped (``dataset.on_bad_image: skip``) with the reason.
The report gathers them into one table, a pandas DataFrame with a row per skipped image (split,
key, path, reason), and is written as ``input_report.json`` (the file later stages read back
through :func:`skipped_keys`), ``input_report.md`` and ``input_report.csv``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from maskdistill.storage import (
    CorruptFileError,
    atomic_path,
    open_mask_shard,
    read_json,
    shard_skipped,
    write_json,
)

COLUMNS = ("split", "key", "path", "reason")


def skipped_table(shards: Mapping[str, Sequence[Path]]) -> pd.DataFrame:
    """One row (split, key, path, reason) per image that mining skipped, from each split's shards."""
    rows = [(split, s.key, s.path, s.reason)
            for split, paths in shards.items() for path in paths for s in shard_skipped(path)]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def mined_count(paths: Sequence[Path]) -> int:
    """Images mined into the given shards."""
    total = 0
    for path in paths:
        with open_mask_shard(path) as h5:
            total += int(h5.attrs["num_images"])
    return total


def input_report(shards: Mapping[str, Sequence[Path]], policy: str) -> dict[str, Any]:
    """The report of the mask shards of each split, as the JSON that is written:
    ``{"on_bad_image": policy, "splits": {split: {"mined", "skipped"}}, "skipped": [row, ...]}``."""
    table = skipped_table(shards)
    per_split = table["split"].value_counts()
    splits = {split: {"mined": mined_count(paths), "skipped": int(per_split.get(split, 0))}
              for split, paths in shards.items()}
    return {"on_bad_image": policy, "splits": splits, "skipped": table.to_dict("records")}


def report_table(report: Mapping[str, Any]) -> pd.DataFrame:
    """The skipped images of a report (as :func:`input_report` returns it) as a DataFrame."""
    return pd.DataFrame(list(report["skipped"]), columns=list(COLUMNS))


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as a short Markdown page: the policy, counts per split, the skipped images."""
    lines = ["# Input report", "",
             f"Policy for unreadable images (`dataset.on_bad_image`): `{report['on_bad_image']}`.", ""]
    lines += [f"- {split}: {c['mined']} images mined, {c['skipped']} skipped"
              for split, c in report["splits"].items()]
    table = report_table(report)
    if table.empty:
        lines += ["", "No image was skipped."]
    else:
        cells = table.assign(path=("`" + table["path"] + "`"), reason=table["reason"].str.replace("|", "/"))
        lines += ["", cells.to_markdown(index=False)]
    return "\n".join(lines) + "\n"


def write_input_report(report: Mapping[str, Any], out_json: Path, out_md: Path) -> None:
    """Write the report as JSON (``out_json``), Markdown (``out_md``) and its skipped images as CSV
    beside the Markdown (same stem, ``.csv``); each file atomically."""
    write_json(out_json, dict(report))
    with atomic_path(out_md) as tmp:
        tmp.write_text(report_markdown(report))
    with atomic_path(Path(out_md).with_suffix(".csv")) as tmp:
        report_table(report).to_csv(tmp, index=False)


def skipped_keys(report_json: str | os.PathLike[str], split: str) -> set[str]:
    """Keys of the images that mining skipped in ``split``, read from an ``input_report.json``."""
    report = read_json(report_json)
    try:
        return {row["key"] for row in report["skipped"] if row["split"] == split}
    except (KeyError, TypeError) as err:
        raise CorruptFileError(f"{report_json}: not an input report written by maskdistill "
                               f"(missing {err})") from err
