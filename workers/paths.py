"""Where a node finds a model file: always inside its models directory, symlinks included."""

from pathlib import Path

from broker.errors import ModelFileNotFound, PathOutsideModelsDir


def resolve_model_path(models_dir: Path, model_id: str, model_path: str | None) -> Path:
    """`model_id` alone means `<dir>/<model_id>.gguf`; `model_path` is relative to the dir or absolute inside it."""
    root = models_dir.resolve()
    if model_path is None:
        candidate = root / f"{model_id}.gguf"
        shown = f"{model_id}.gguf"
    else:
        if "\x00" in model_path:
            raise PathOutsideModelsDir("modelPath contains a NUL byte.")
        given = Path(model_path)
        candidate = given if given.is_absolute() else root / given
        shown = model_path
    try:
        real = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError up to Python 3.12, OSError after
        raise ModelFileNotFound(f"Model file {shown!r} cannot be reached: {exc}.", path=str(candidate)) from None
    if not real.is_relative_to(root):
        raise PathOutsideModelsDir(
            f"Model path {shown!r} resolves outside this node's models directory; only files inside it can be loaded.",
        )
    if not real.is_file():
        raise ModelFileNotFound(
            f"Model file {shown!r} was not found in this node's models directory.", path=str(candidate)
        )
    return real
