"""Offline TTS service with zero-shot voice cloning (XTTS-v2)."""
__version__ = "0.1.0"
