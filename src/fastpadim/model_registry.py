"""The models one service serves, by name, and their reloading without dropping a request.

Each ``ServedModel`` has its own ``MicroBatcher`` (one thread owns that model) and drift monitor. A request holds
its model for its whole life (``ModelRegistry.use``), so a reload swaps in the new model for new requests while
the ones already queued or in flight finish on the old one; the old batcher stops once none is left.
A reload only ever loads a version file found beside the served one (``lineage.versions``): no request names a
path.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .batcher import MicroBatcher
from .drift import DriftMonitor
from .errors import FastpadimError
from .lineage import model_name, model_version, versions
from .recording import Run
from .records.inspection import utc_now
from .results import VERDICT_LABELS, verdict
from .serve import model_summary, release_memory, score_batch, warm_up

log = logging.getLogger("fastpadim.serve")


class NoSuchModel(FastpadimError):
    """A model name, or a version of one, that this service does not have (HTTP 404)."""


def load_model(path: str | Path):
    """The default loader: ``fastpadim.load`` with its defaults (the command line passes its own options)."""
    from . import load

    return load(path)


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 8
    max_wait_s: float = 0.005
    max_queue: int = 256


@dataclass(eq=False)
class ServedModel:
    """One model behind the API: its name (``lineage.model_name`` of its file), version, summary (GET /v1/model),
    batcher (the one thread that runs it) and drift monitor; ``users`` requests hold it now."""

    name: str
    path: str | None
    model: object
    limits: BatchLimits
    version: int = field(init=False)
    summary: dict = field(init=False)
    batcher: MicroBatcher = field(init=False)
    drift: DriftMonitor = field(init=False)
    loaded: datetime.datetime = field(default_factory=utc_now, init=False)
    users: int = field(default=0, init=False)  # requests holding this model now
    retired: bool = field(default=False, init=False)
    _idle: asyncio.Event | None = field(default=None, init=False)

    def __post_init__(self):
        model = self.model
        self.version = model_version(model)
        self.summary = {"name": self.name, "version": self.version, **model_summary(model, self.path)}
        # after a burst, the network's freed memory goes back to the OS
        self.batcher = MicroBatcher(lambda images: score_batch(model, images), self.limits.max_batch,
                                    self.limits.max_wait_s, self.limits.max_queue, on_idle=release_memory)
        self.drift = DriftMonitor(getattr(model, "calibration_", None), model.threshold_,
                                  getattr(model, "false_alarm_rate", None))

    @property
    def threshold(self) -> float | None:
        return self.model.threshold_

    @property
    def run(self) -> Run:
        """What this model's verdicts are recorded with."""
        return Run(self.loaded, self.name, self.version, self.path and os.path.abspath(self.path), self.threshold)

    def judge(self, score: float) -> tuple[str, bool | None]:
        """results.verdict, the one place a verdict is made: a non-finite score raises FastpadimError (no verdict)."""
        flagged = verdict(score, self.threshold)
        return VERDICT_LABELS[flagged], flagged

    def versions(self) -> dict[int, Path]:
        return versions(self.path) if self.path else {}

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "versions": sorted(self.versions()),
                "model_file": self.path, "threshold": self.threshold}

    async def start(self) -> None:
        self._idle = asyncio.Event()
        await self.batcher.start()

    def hold(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.retired and not self.users:
            self._idle.set()

    async def retire(self) -> None:
        """Stop once the requests holding this model are done (new ones already go to its successor)."""
        self.retired = True
        if self.users:
            await self._idle.wait()
        await self.batcher.stop()


def names_of(paths: list[str | Path]) -> dict[str, Path]:
    """Model files by the names they are served under (``lineage.model_name``), which must differ."""
    named: dict[str, Path] = {}
    for path in map(Path, paths):
        name = model_name(path)
        if name in named:
            raise FastpadimError(f"two models are named {name} ({named[name]}, {path}): serve models with "
                                 "distinct names")
        named[name] = path
    return named


class ModelRegistry:
    """The served models by name; ``loader(path) -> model`` loads a version on reload (in a worker thread)."""

    def __init__(self, models: dict[str, tuple[object, str | None]], limits: BatchLimits = BatchLimits(),
                 loader: Callable[[Path], object] = load_model):
        if not models:
            raise FastpadimError("no model to serve")
        self.limits, self.loader = limits, loader
        self.models = {name: ServedModel(name, None if path is None else str(path), model, limits)
                       for name, (model, path) in models.items()}
        self._retiring: dict[asyncio.Task, ServedModel] = {}  # replaced models finishing their requests
        self._reload_lock: asyncio.Lock | None = None

    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise FastpadimError(f"several models are served ({', '.join(self.models)}): name one with ?model=NAME")
        try:
            return self.models[name]
        except KeyError:
            raise NoSuchModel(f"no model named {name!r} is served (served: {', '.join(self.models)})") from None

    @asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[ServedModel]:
        """The model a request runs on, held until the request is done (a reload waits for it)."""
        served = self.get(name)
        served.hold()
        try:
            yield served
        finally:
            served.release()

    # ------------------------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        self._reload_lock = asyncio.Lock()
        for served in self.models.values():
            await served.start()

    async def stop(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for served in [*self._retiring.values(), *self.models.values()]:
            await served.batcher.stop()

    async def reload(self, name: str | None = None, version: int | None = None) -> dict:
        """Load ``version`` (default: the newest file) of a served model, warm it up, and swap it in."""
        async with self._reload_lock:
            old = self.get(name)
            if old.path is None:
                raise FastpadimError(f"{old.name} was not loaded from a file: there is no other version to load")
            found = old.versions()
            if version is None and not found:
                raise NoSuchModel(f"no file of {old.name} is left beside {old.path}")
            version = max(found) if version is None else version
            if version not in found:
                listed = ", ".join(map(str, found)) or "none"
                raise NoSuchModel(f"no version {version} of {old.name} beside {old.path} (versions: {listed})")
            model = await asyncio.to_thread(self._load_warm, found[version])
            new = ServedModel(old.name, str(found[version]), model, self.limits)
            await new.start()
            self.models[old.name] = new  # new requests go to it from here on
        task = asyncio.create_task(old.retire(), name=f"fastpadim-retire-{old.name}")
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))
        log.info("reloaded %s: version %s -> %s (%s)", new.name, old.version, new.version, new.path)
        return {"model": new.name, "version": new.version, "previous_version": old.version,
                "model_file": new.path, "threshold": new.threshold}

    async def reload_all(self) -> None:
        """Every model to its newest version, one log line each (SIGHUP)."""
        for name in self.names():
            try:
                await self.reload(name)
            except Exception as exc:  # noqa: BLE001 - the old model keeps serving
                log.error("reload of %s failed, version %s keeps serving: %s", name, self.models[name].version,
                          str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _load_warm(self, path: Path):
        model = self.loader(path)
        warm_up(model)
        return model
