"""The `offline-tts` command: run the service, or write a random-weight checkpoint for tests/benchmarks."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import Settings

log = logging.getLogger("offline_tts")


_KEY_IN_QUERY = re.compile(r"((?:api_key|xi_api_key|xi-api-key)=)[^&\s\"']+", re.IGNORECASE)


class RedactKeys(logging.Filter):
    """A key in a URL's query (api_key=...: browsers' WebSockets cannot send headers) never reaches the log;
    uvicorn logs WebSocket paths with their query."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _KEY_IN_QUERY.sub(r"\1***", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str = "info", json_logs: bool = False) -> None:
    """Plain text lines, or one JSON object per line (TTS_LOG_JSON) with the access log's fields as keys."""
    handler = logging.StreamHandler()
    handler.addFilter(RedactKeys())
    if json_logs:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings (torch, coqui) become log records, JSON too


def load_settings(**overrides) -> Settings | None:
    """The settings, or None after logging what is wrong with them (never the values: one may be the key)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        setup_logging()
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                log.error("Invalid setting %s: %s", "TTS_" + "_".join(str(part) for part in err["loc"]).upper(), message)
            else:  # a rule between settings
                log.error("Invalid settings: %s", message)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.header_limits import limited_headers_protocol

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = load_settings(**overrides)
    if settings is None:
        return 2
    setup_logging(settings.log_level, settings.log_json)
    from .engine.download import ModelUnavailableError, check_model_dir_readable
    from .engine.model_files import missing_model_files

    try:  # a folder of another user: a clear error naming it, not a PermissionError traceback
        check_model_dir_readable(settings.model_dir)
    except ModelUnavailableError as exc:
        log.error("%s", exc)
        return 2
    missing = missing_model_files(settings.model_dir)
    if missing and not (settings.license_accepted and settings.download):
        from .engine.download import ensure_model

        try:  # raises with the full explanation (directory, files expected, how to fix)
            ensure_model(settings.model_dir, accept_license=settings.license_accepted, base_url=settings.model_url,
                         allow_download=settings.download)
        except ModelUnavailableError as exc:
            log.error("%s", exc)
            return 2
    from .app import create_app

    app = create_app(settings)
    log.info("Starting the TTS service on %s://%s:%d (model dir %s, voices %s)",
             "https" if settings.ssl_certfile else "http", settings.host, settings.port,
             settings.model_dir, settings.voices_dir)
    if settings.api_key:
        log.info("API key required on every route but /health, /ui%s (TTS_API_KEY)",
                 " and the model/voice lists" if settings.public_lists else "")
    # log_config=None: uvicorn's own lines go through our handler (JSON too); the access log is ours
    # (offline_tts.access: one line per request with its id, voice, audio seconds...).
    # On SIGTERM uvicorn stops accepting, lets running responses finish for the grace period, then exits.
    # http: httptools with a bound on request headers (431), checked before any route or key.
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
        access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        http=limited_headers_protocol(settings.max_header_bytes, settings.max_headers),
        # The protocol's own bound, above the routes' (which answer a clear error first): 1009 beyond it.
        ws_max_size=2 * settings.ws_max_message_bytes + 1024,
        ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile))
    app.state.on_fatal = lambda: setattr(server, "should_exit", True)  # a model that cannot load: stop, exit 1
    server.run()
    return 1 if app.state.service.state == "failed" else 0


def cmd_random_model(args: argparse.Namespace) -> int:
    setup_logging()
    from .engine.random_model import write_random_checkpoint

    try:
        path = write_random_checkpoint(Path(args.dir), size=args.size, seed=args.seed, overwrite=args.force)
    except FileExistsError as exc:
        log.error("%s (pass --force to replace it)", exc)
        return 2
    log.info("Random-weight XTTS-v2 checkpoint (%s) written to %s", args.size, path)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings is None:
        return 2
    setup_logging(settings.log_level)
    from .engine.download import ModelUnavailableError, ensure_model

    target = Path(args.dir) if args.dir else settings.model_dir
    try:
        ensure_model(target, accept_license=settings.license_accepted or args.accept_license, base_url=settings.model_url)
    except ModelUnavailableError as exc:
        log.error("%s", exc)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offline-tts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service (settings from TTS_* variables / .env)")
    serve.add_argument("--host", help="override TTS_HOST")
    serve.add_argument("--port", type=int, help="override TTS_PORT")
    serve.set_defaults(func=cmd_serve)
    rnd = sub.add_parser("random-model", help="write an XTTS-v2 checkpoint with random weights (tests, benchmarks)")
    rnd.add_argument("dir", help="output directory")
    rnd.add_argument("--size", choices=["tiny", "full"], default="tiny", help="tiny: seconds to build; full: the real architecture")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--force", action="store_true", help="replace model files already in DIR")
    rnd.set_defaults(func=cmd_random_model)
    dl = sub.add_parser("download", help="download the official XTTS-v2 files (needs the CPML license accepted)")
    dl.add_argument("dir", nargs="?", help="target directory (default TTS_MODEL_DIR)")
    dl.add_argument("--accept-license", action="store_true", help="accept the Coqui Public Model License")
    dl.set_defaults(func=cmd_download)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
