"""Query splits: which queries a command may train on, choose settings on, and report on.

A split file is JSON: {"train": [qid, ...], "validation": [...], "test": [...], ...metadata}, the three
lists disjoint. `make_splits` draws them from a seeded shuffle of the sorted qids (the same file for the
same qids, shares and seed, whatever order the collection lists its queries in), or keeps given test qids
(an official test set) and splits the rest.

Training on test queries is refused (`TestLeakError`): a student distilled from labels of the queries it is
evaluated on (e.g. the offline-qrels teacher, which *is* the test judgements) measures nothing. Commands
override the refusal only with `allow_test_leak=true`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared_kernels.runconfig import ConfigError

SPLITS = ("train", "validation", "test")


class TestLeakError(ConfigError):
    """Test queries would be used for training."""

    __test__ = False  # not a pytest test class


def make_splits(
    qids: Iterable[str],
    validation: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    test_qids: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """Seeded disjoint train / validation / test qid lists (each sorted).

    Args:
        qids: every query id of the collection.
        validation, test: shares of the queries in [0, 1), together < 1 (rounded to the nearest count).
            `test` is unused when `test_qids` is given; `validation` is then a share of the rest.
        seed: seed of the shuffle.
        test_qids: a given test set (must be a subset of `qids`).
    """
    pool = sorted(set(map(str, qids)))
    if not pool:
        raise ValueError("qids is empty: no query to split")
    for name, share in (("validation", validation), ("test", test)):
        if not 0 <= share < 1:
            raise ValueError(f"{name} must be a share in [0, 1), got {share!r}")
    rng = random.Random(seed)
    if test_qids is not None:
        given = sorted(set(map(str, test_qids)))
        unknown = sorted(set(given) - set(pool))
        if unknown:
            raise ValueError(
                f"test_qids holds {len(unknown)} qid(s) not in the collection, e.g. {unknown[:5]}"
            )
        rest = [q for q in pool if q not in set(given)]
        rng.shuffle(rest)
        n_val = round(validation * len(rest))
        out = {"train": rest[n_val:], "validation": rest[:n_val], "test": given}
    else:
        if validation + test >= 1:
            raise ValueError(f"validation + test must be < 1, got {validation} + {test}")
        rng.shuffle(pool)
        n_test, n_val = round(test * len(pool)), round(validation * len(pool))
        out = {
            "test": pool[:n_test],
            "validation": pool[n_test : n_test + n_val],
            "train": pool[n_test + n_val :],
        }
    if not out["train"]:
        raise ValueError(f"no training query left out of {len(pool)}: lower validation/test")
    return {name: sorted(out[name]) for name in SPLITS}


def read_splits(path: str | Path) -> dict[str, list[str]]:
    """The train / validation / test lists of a split file, checked (lists of strings, disjoint)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"splits file {str(path)!r} does not exist (write one with `rerankdistill split`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"splits file {str(path)!r} is not JSON: {e}") from None
    if not isinstance(data, Mapping) or any(not isinstance(data.get(s), list) for s in SPLITS):
        raise ConfigError(f"splits file {str(path)!r} must hold lists 'train', 'validation' and 'test'")
    out = {s: [str(q) for q in data[s]] for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            both = sorted(set(out[a]) & set(out[b]))
            if both:
                raise ConfigError(
                    f"splits file {str(path)!r}: {len(both)} qid(s) in both {a} and {b}, e.g. {both[:5]}"
                )
    return out


def select_split(splits: Mapping[str, list[str]] | None, name: str, default: str) -> set[str] | None:
    """The qids of split `name` (or `default` when name is empty); None when no split file is used."""
    if splits is None:
        if name:
            raise ConfigError(f"queries={name} needs splits=FILE (written by `rerankdistill split`)")
        return None
    name = name or default
    if name not in SPLITS:
        raise ConfigError(f"queries must be one of {', '.join(SPLITS)}, got {name!r}")
    return set(splits[name])


def check_no_test_leak(
    qids: Iterable[str], splits: Mapping[str, list[str]] | None, allow: bool, what: str
) -> None:
    """Refuse training data holding test qids (unless `allow`): `what` names the data in the message."""
    if splits is None or allow:
        return
    leaked = sorted(set(map(str, qids)) & set(splits["test"]))
    if leaked:
        raise TestLeakError(
            f"{what} holds {len(leaked)} test quer{'y' if len(leaked) == 1 else 'ies'} of the "
            f"splits file (e.g. {leaked[:5]}): training on test queries leaks their judgements "
            "into the evaluation; use queries=train, or set allow_test_leak=true to do it anyway"
        )
