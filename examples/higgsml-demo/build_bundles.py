"""Pack the HiggsML demo challenge into the five archives that an evaluation job mounts.

Usage: python3 build_bundles.py --out DIR

The script generates input_data/ and reference_data/ with make_data.py, then writes
DIR/<name>.tar.gz for each name in ARCHIVE_NAMES and prints one JSON line per
archive with its name, path, sha256 and size in bytes. Each archive contains the
files of its folder at the archive root, so extracting it into /inputs/<name>/
gives paths such as /inputs/ingestion_program/ingestion.py. COMMAND is the
container command that runs the evaluation on those folders.

The archives are reproducible: members are sorted, and their mtime, uid and gid are
0. Two builds with the same sources and the same zlib produce the same bytes.
"""

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shlex
import stat
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# Archive names, which are also the folder names under /inputs in the container.
ARCHIVE_NAMES = (
    "ingestion_program",
    "scoring_program",
    "input_data",
    "reference_data",
    "sample_submission",
)

# Folders under the bundle source that are packed as they are. make_data.py
# generates the other two.
SOURCE_FOLDERS = ("ingestion_program", "scoring_program", "sample_submission")

# /inputs is read-only, /tmp is a small writable tmpfs, and /output receives
# scores.json.
COMMAND = (
    '/bin/sh -c "python3 /inputs/ingestion_program/ingestion.py'
    " --input /inputs/input_data --submission /inputs/sample_submission"
    " --output /tmp/predictions"
    " && python3 /inputs/scoring_program/score.py --predictions /tmp/predictions"
    ' --reference /inputs/reference_data --output /output"'
)

# COMMAND split into an argument vector, for APIs that take one.
COMMAND_ARGV = shlex.split(COMMAND)

# Host-side files that must never enter an archive.
SKIPPED_DIRS = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".partial")


def load_module(name, path):
    """Import the Python file at path under the given module name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def list_files(folder):
    """Return the relative paths of the regular files under folder, sorted.

    Compiled bytecode and __pycache__ folders are skipped. Raises ValueError for a
    symbolic link or any other entry that is neither a file nor a folder, because
    an archive must contain plain files only.
    """
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for entry in dirs + files:
            full = os.path.join(root, entry)
            mode = os.lstat(full).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ValueError(
                    f"{full} is not a regular file or folder, so it cannot be packed"
                )
        for entry in files:
            if entry.endswith(SKIPPED_SUFFIXES):
                continue
            relative = os.path.relpath(os.path.join(root, entry), folder)
            paths.append(relative.replace(os.sep, "/"))
    return sorted(paths)


def pack_folder(folder, archive_path):
    """Write the files of folder to a reproducible .tar.gz, paths relative to folder."""
    members = list_files(folder)
    if not members:
        raise ValueError(f"{folder} contains no files to pack")

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for relative in members:
            with open(os.path.join(folder, relative), "rb") as handle:
                content = handle.read()
            info = tarfile.TarInfo(relative)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(content))

    # GzipFile with mtime=0 and no file name keeps the gzip header free of the
    # build time and of the output path.
    with (
        open(archive_path, "wb") as raw,
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9
        ) as packed,
    ):
        packed.write(buffer.getvalue())


def describe_archive(name, path):
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return {"name": name, "path": path, "sha256": digest, "size": os.path.getsize(path)}


def build_bundles(out_dir, src_dir=HERE):
    """Generate the data, pack the five archives into out_dir and describe them.

    Returns one dict per archive in ARCHIVE_NAMES order, with the keys name, path
    (absolute), sha256 (hex digest) and size (bytes).
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    make_data = load_module(
        "higgsml_demo_make_data", os.path.join(src_dir, "make_data.py")
    )

    with tempfile.TemporaryDirectory(prefix="higgsml-demo-data-") as data_dir:
        input_dir, reference_dir = make_data.make_data(data_dir)
        folders = {name: os.path.join(src_dir, name) for name in SOURCE_FOLDERS}
        folders["input_data"] = input_dir
        folders["reference_data"] = reference_dir

        descriptions = []
        for name in ARCHIVE_NAMES:
            path = os.path.join(out_dir, f"{name}.tar.gz")
            pack_folder(folders[name], path)
            descriptions.append(describe_archive(name, path))
    return descriptions


def expected_scores(bundle_src_dir=HERE, submission_dir=None):
    """Run ingestion and scoring in this process and return the scores dict.

    The data are generated with make_data.py into a temporary folder, exactly as
    build_bundles generates them, and submission_dir defaults to the bundle's
    sample_submission. The result is the scores.json that COMMAND writes in the
    container from the same archives.
    """
    if submission_dir is None:
        submission_dir = os.path.join(bundle_src_dir, "sample_submission")
    make_data = load_module(
        "higgsml_demo_make_data", os.path.join(bundle_src_dir, "make_data.py")
    )
    ingestion = load_module(
        "higgsml_demo_ingestion",
        os.path.join(bundle_src_dir, "ingestion_program", "ingestion.py"),
    )
    scoring = load_module(
        "higgsml_demo_score",
        os.path.join(bundle_src_dir, "scoring_program", "score.py"),
    )

    with tempfile.TemporaryDirectory(prefix="higgsml-demo-run-") as work_dir:
        input_dir, reference_dir = make_data.make_data(os.path.join(work_dir, "data"))
        predictions_dir = os.path.join(work_dir, "predictions")
        ingestion.run_ingestion(input_dir, submission_dir, predictions_dir)
        return scoring.run_scoring(
            predictions_dir, reference_dir, os.path.join(work_dir, "output")
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the HiggsML demo archives.")
    parser.add_argument(
        "--out", required=True, help="folder that receives the .tar.gz files"
    )
    args = parser.parse_args(argv)
    for description in build_bundles(args.out):
        print(json.dumps(description), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
