"""Which dataset paths a set of globs picks: the one matcher behind `ls PATTERN`, `get`,
`download --include/--exclude` and `upload --include/--exclude`. Pure.

Globs are fnmatch's, over the whole '/'-separated path relative to the tree or dataset root:
`*` also crosses '/', so `*.jpg` picks every JPEG at any depth and `cache/*` everything under
cache/. Case-sensitive on every platform."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def path_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A predicate for "matches any of these globs": literal paths by set lookup, the globs as
    one compiled regular expression (1,000 paths against 1,000,000 files stays cheap)."""
    literal = {p for p in patterns if not any(c in p for c in "*?[")}
    globs = [p for p in patterns if p not in literal]
    regex = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None
    return lambda path: path in literal or (regex is not None and regex.match(path) is not None)


def _none(_path: str) -> bool:
    return False


def _every(_path: str) -> bool:
    return True


@dataclass(frozen=True)
class PathFilter:
    """--include / --exclude: a path is selected when it matches any include glob (every path
    when none is given) and no exclude glob."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    _included: Callable[[str], bool] = field(init=False, repr=False, compare=False)
    _excluded: Callable[[str], bool] = field(init=False, repr=False, compare=False)
    _excluded_dirs: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        include, exclude = tuple(self.include), tuple(self.exclude)
        for glob in (*include, *exclude):
            if not isinstance(glob, str) or not glob:
                raise ValueError(f"a glob must be a non-empty string, got {glob!r:.80}")
        # frozen: the matchers are set once, here
        object.__setattr__(self, "include", include)
        object.__setattr__(self, "exclude", exclude)
        object.__setattr__(self, "_included", path_matcher(include) if include else _every)
        object.__setattr__(self, "_excluded", path_matcher(exclude) if exclude else _none)
        # An exclude glob ending in '*' that matches "dir/" matches every path below dir/
        # (its last '*' takes the rest): such a directory need not even be walked.
        whole = [g for g in exclude if g.endswith("*")]
        object.__setattr__(self, "_excluded_dirs", path_matcher(whole) if whole else _none)

    def __bool__(self) -> bool:
        """Whether it leaves anything out at all."""
        return bool(self.include or self.exclude)

    def selects(self, path: str) -> bool:
        return self._included(path) and not self._excluded(path)

    def may_select_under(self, directory: str) -> bool:
        """False only when no path below `directory` can be selected (an exclude glob takes
        them all); True when some might (an include glob such as `*.jpg` may pick files at
        any depth)."""
        return not self._excluded_dirs(directory + "/")

    def describe(self) -> str:
        """As the options were given: `--include G --exclude H`."""
        return " ".join(
            [*(f"--include {g}" for g in self.include), *(f"--exclude {g}" for g in self.exclude)]
        )

    def to_json(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_json(cls, data: Any) -> PathFilter:
        """Raises ValueError naming what is wrong."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"a filter is an object with include and exclude, not {data!r:.80}")
        globs = [data.get("include", []), data.get("exclude", [])]
        if not all(isinstance(g, list) for g in globs):
            raise ValueError("a filter's include and exclude are lists of globs")
        return cls(tuple(globs[0]), tuple(globs[1]))


NO_FILTER = PathFilter()
