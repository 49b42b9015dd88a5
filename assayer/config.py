"""The settings of one watch and the identity that names it in Redis."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re

DEFAULT_REGEX = r"^.*\.(pt|pth|ckpt|model|state)$"
"""The pattern of checkpoint paths when `--regex_filter` is not given."""


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """Everything a watch job and an evaluation job need to know about one watch.

    `directory` and a file evaluator's path are absolute, so workers started anywhere agree on them.
    `search_path` is the working directory of the watch command, put on `sys.path` of the workers so
    that `package.module.function` evaluators import there as they did when the watch was checked.
    A timeout of 0 means no limit.
    """

    directory: str
    evaluator: str
    regex: str = DEFAULT_REGEX
    polling_interval: float = 5.0
    settle_seconds: float = 5.0
    ready_marker: str | None = None
    eval_timeout: int = 0
    max_retries: int = 0
    watch_queue: str = "watch"
    eval_queue: str = "evaluation"
    search_path: str | None = None
    tensorboard_dir: str | None = None

    @functools.cached_property
    def watch_id(self) -> str:
        """A short stable name for the watch, derived from its directory, evaluator and regex."""
        identity = json.dumps([self.directory, self.evaluator, self.regex])
        return hashlib.sha1(identity.encode()).hexdigest()[:12]

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.regex)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def from_json(cls, text: str | bytes) -> WatchConfig:
        """Parse a config. The same text gives the same instance, so a worker parses each watch's config once."""
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in json.loads(text).items() if key in fields}
        return cls(**values)
