"""Where ``prunekit tune`` keeps its studies: an Optuna storage opened from a URL, with clear errors.

SQLAlchemy URLs (``sqlite:///file.db``, ``postgresql://...``, ``mysql://...``) become an RDB storage
with heartbeats (a trial whose worker died is failed, then retried with its values); ``journal:PATH``
a journal file. On SQLite every transaction takes the write lock when it begins, so workers that
share one file never both take one waiting trial.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from prunekit.errors import PrunekitError

HEARTBEAT = 10  # seconds between a running trial's heartbeats; a trial silent for 3x this is failed and retried
INSTALL_HINT = "pip install 'prunekit[tune]'"


def require_optuna():
    """Optuna, or a :class:`PrunekitError` with the install command."""
    try:
        import optuna
    except ImportError as exc:
        raise PrunekitError(f"prunekit tune needs Optuna, which is not installed ({exc}); install it with: "
                            f"{INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ---- what a completed trial holds (user attributes written by the objective) ----
def accuracy(trial: Any) -> float:
    return trial.user_attrs["scored"]["accuracy"]


def flops_ratio(trial: Any) -> float:
    return trial.user_attrs["candidate"]["flops_ratio"]


def recipe_of(trial: Any) -> dict:
    return trial.user_attrs["candidate"]["recipe"]


def shown_url(url: str) -> str:
    """A storage URL with its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (journal:PATH) or no SQLAlchemy
        return url


def open_storage(url: str, heartbeat: int = HEARTBEAT) -> Any:
    """An Optuna storage for ``url``: an SQLAlchemy URL (``sqlite:///file.db``, ``postgresql://...``,
    ``mysql://...``) or ``journal:PATH`` (a journal file). Unreachable or malformed: a PrunekitError."""
    optuna = require_optuna()
    valid = "valid: sqlite:///PATH, postgresql://USER@HOST/DB, mysql://..., journal:PATH"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = url.partition(":")[2]
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        except OSError as exc:
            raise PrunekitError(f"storage {url!r} cannot be opened: {exc.strerror or exc}; {valid}") from None
    import inspect

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme:
        raise PrunekitError(f"storage {url!r} is not a storage URL; {valid}")
    given = url
    if scheme == "postgresql" and _imports("psycopg") and not _imports("psycopg2"):
        url = "postgresql+psycopg" + url[len(scheme):]  # SQLAlchemy's default driver is psycopg2
    engine: dict[str, Any] = {}
    if scheme.startswith("sqlite"):
        engine = {"connect_args": {"timeout": 60}}  # workers sharing one file wait for its lock
    elif scheme.startswith("postgresql"):
        engine = {"connect_args": {"connect_timeout": 10}}
    options: dict[str, Any] = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat}
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    if "heartbeat_stale_trial_callback" in params:  # Optuna >= 4.9
        options["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    else:
        options["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=3)
    try:
        for attempt in range(10):
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **options)
                if scheme.startswith("sqlite"):
                    _serialise_sqlite(storage.engine)
                return storage
            except Exception as exc:  # workers starting together race to make the tables: the loser retries
                if attempt == 9 or not any(s in str(exc).lower() for s in ("already exists", "database is locked",
                                                                           "unique", "duplicate")):
                    raise
                time.sleep(0.2 * (attempt + 1))
    except ModuleNotFoundError as exc:
        raise PrunekitError(f"storage {shown_url(given)!r} needs the database driver {exc.name!r}, which is not "
                            f"installed (PostgreSQL: pip install psycopg)") from None
    except Exception as exc:  # SQLAlchemy: bad URL, refused connection, unknown database, unwritable file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunekitError(f"storage {shown_url(given)!r} cannot be reached: {first}; {valid}") from None


def _serialise_sqlite(engine: Any) -> None:
    """Every transaction on an SQLite file takes its write lock when it begins (``BEGIN IMMEDIATE``).

    SQLite ignores ``SELECT ... FOR UPDATE``, on which Optuna relies when a worker takes a waiting
    (enqueued or retried) trial: two workers could otherwise both read it as waiting and both run it.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN off: SQLAlchemy's below instead

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners: closed, so that every one gets them


def _imports(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
