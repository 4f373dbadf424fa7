"""Output directory and checkpoints: never mistake a half-written save for a complete one, never lose a run.

A checkpoint is written into ``output_dir/.staging/`` and renamed to ``output_dir/checkpoint-N`` only once
complete; a rename within one file system is atomic, so a kill during a save leaves either the previous
checkpoints or the new complete one (plus a ``.staging`` leftover, removed by the next run). The final
adapter files are moved into ``output_dir`` one by one with the same atomic rename.
"""

from __future__ import annotations

import os
import re
import shutil

STAGING = ".staging"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"  # written last by Trainer._save_checkpoint
CONFIG_FILE = "train_config.yaml"  # written by every paca train run: marks a directory as one of ours
RUN_FILES = ("metrics.jsonl", "loss.png", "summary.json", CONFIG_FILE)
PREVIOUS_RUN = ".previous-run"  # overwrite=true: the replaced run, until the new one has saved its model
# What a run saves into output_dir besides its logs: what overwrite=true sets aside from the run it replaces.
MODEL_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "training_args.bin",
    "README.md",
)


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_checkpoint(output_dir: str) -> str | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def describe_run(output_dir: str) -> str:
    """What ``output_dir`` holds, in a few words ('' when it is missing, empty, or holds only the config of a
    run that stopped before it logged anything)."""
    if not os.path.isdir(output_dir):
        return ""
    entries = [e for e in os.listdir(output_dir) if e not in (STAGING, CONFIG_FILE, PREVIOUS_RUN)]
    if not entries:
        return ""
    found = checkpoints(output_dir)
    parts = [f"{len(found)} checkpoint(s), newest {os.path.basename(found[-1][1])}"] if found else []
    parts += [name for name in ("adapter_model.safetensors", "model.safetensors", "metrics.jsonl") if name in entries]
    return ", ".join(parts) or f"{len(entries)} file(s)"


def _check_writable(output_dir: str) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir '{output_dir}' is a file, not a directory; choose another output_dir.")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"output_dir '{output_dir}' cannot be created: '{existing}' is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir '{output_dir}' is not writable (no permission on '{existing}').")


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool, model_path: str = "") -> str | None:
    """Check ``output_dir`` against resume/overwrite; return the checkpoint to resume from (or None).

    Runs before anything is loaded or written. ``overwrite`` only ever replaces a directory that ``paca
    train`` wrote (it holds ``train_config.yaml``), and never the base model's own directory.

    Raises:
        FileExistsError: the directory holds another run and neither resume nor overwrite is set, or
            overwrite is set for a directory paca train did not write or that holds the base model.
        FileNotFoundError: resume is set but there is no complete checkpoint to resume from.
        ValueError: output_dir is a file or cannot be written.
    """
    _check_writable(output_dir)
    held = describe_run(output_dir)
    if resume:
        checkpoint = newest_checkpoint(output_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"resume=true but output_dir '{output_dir}' holds no complete checkpoint "
                f"({held or 'it is empty or missing'}); run without resume to start afresh."
            )
        return checkpoint
    if not held:
        return None
    if not overwrite:
        raise FileExistsError(
            f"output_dir '{output_dir}' already holds a run ({held}); set resume=true to continue "
            "it, overwrite=true to replace it, or choose another output_dir."
        )
    if (
        model_path
        and os.path.isdir(model_path)
        and (_inside(model_path, output_dir) or _inside(output_dir, model_path))
    ):
        raise FileExistsError(
            f"overwrite=true would delete files of the base model '{model_path}' (output_dir "
            f"'{output_dir}' holds it or lies inside it); choose another output_dir."
        )
    if not os.path.isfile(os.path.join(output_dir, CONFIG_FILE)):
        raise FileExistsError(
            f"output_dir '{output_dir}' holds files paca train did not write ({held}; no "
            f"{CONFIG_FILE}); overwrite=true only replaces paca train's own runs. Choose another "
            "output_dir."
        )
    return None


def _previous_run_paths(output_dir: str, files: tuple[str, ...]) -> list[str]:
    """The previous run's checkpoints, model files and logs in ``output_dir`` (other files are not paca's)."""
    paths = [path for step, path in checkpoints(output_dir)]
    sharded = re.compile(
        r"^(model|adapter_model)-\d+-of-\d+\.safetensors$|^(model|adapter_model)\.safetensors\.index\.json$"
    )
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if (name in RUN_FILES + files or sharded.match(name)) and os.path.isfile(path):
            paths.append(path)
    return paths


def set_aside_previous_run(output_dir: str, files: tuple[str, ...]) -> None:
    """overwrite=true: move the previous run into ``output_dir/.previous-run`` (renames, nothing copied); it is
    deleted only once the new run has saved its model (:func:`discard_previous_run`), so a new run that fails
    or is stopped loses nothing. A ``.previous-run`` left by such a failed attempt holds the older run: it is
    kept, and what the failed attempt wrote is deleted."""
    aside = os.path.join(output_dir, PREVIOUS_RUN)
    older_kept = os.path.isdir(aside)
    os.makedirs(aside, exist_ok=True)
    for path in _previous_run_paths(output_dir, files):
        if older_kept:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        else:
            os.replace(path, os.path.join(aside, os.path.basename(path)))


def discard_previous_run(output_dir: str) -> None:
    """Delete what :func:`set_aside_previous_run` kept: the new run has saved its model."""
    shutil.rmtree(os.path.join(output_dir, PREVIOUS_RUN), ignore_errors=True)


def remove_staging(output_dir: str) -> None:
    """Drop what an interrupted save left behind (never a complete checkpoint: those are renamed out)."""
    shutil.rmtree(os.path.join(output_dir, STAGING), ignore_errors=True)


def fsync_tree(path: str) -> None:
    """Flush a directory's files to disk, so the rename that publishes them also survives a power cut."""
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def publish_directory(staged: str, final: str) -> None:
    """Atomically make the complete directory ``staged`` appear as ``final`` (replacing an older ``final``)."""
    fsync_tree(staged)
    if os.path.exists(final):
        retired = final + ".replaced"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staged, final)
        shutil.rmtree(retired)
    else:
        os.replace(staged, final)


def publish_files(staged: str, output_dir: str) -> list[str]:
    """Move every file of ``staged`` into ``output_dir``, each by an atomic rename; return their names."""
    fsync_tree(staged)
    names = sorted(os.listdir(staged))
    for name in names:
        os.replace(os.path.join(staged, name), os.path.join(output_dir, name))
    shutil.rmtree(staged)
    return names
