"""What an XTTS-v2 model directory holds, and where the real files come from: one home for the file list
(the loader, the downloader, the random-weight builder, the CLI, tests and benchmarks all use it)."""

from __future__ import annotations

from pathlib import Path

REQUIRED_FILES = ("config.json", "model.pth", "vocab.json", "speakers_xtts.pth")

HF_REPO = "coqui/XTTS-v2"
REVISION = "6c2b0d75eae4b7047358e3b6bd9325f857d43f77"  # v2.0.3, the last XTTS-v2 release
DEFAULT_BASE_URL = f"https://huggingface.co/{HF_REPO}/resolve/{REVISION}"


def missing_model_files(model_dir: Path) -> list[str]:
    """The REQUIRED_FILES that are not regular files in `model_dir` (all of them if it is absent)."""
    model_dir = Path(model_dir)
    return [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
