"""The README documents every setting (TTS_* variable) the service reads."""

from pathlib import Path

from offline_tts.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented():
    missing = [f"TTS_{name.upper()}" for name in Settings.model_fields if f"`TTS_{name.upper()}`" not in README]
    assert not missing, f"README lacks: {missing}"


def test_quick_start_commands():
    assert "make run" in README and "make test" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "make test" in ci
