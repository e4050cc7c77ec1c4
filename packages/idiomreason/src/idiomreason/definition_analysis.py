"""The paper's definition analysis: how good are the definitions each model wrote (the first pass of the
cot_definition condition, kept in `definitions.jsonl`)?

- `score_definitions`: each stored definition against a reference gloss of the expression (a local file in
  any `definitions.load_definitions` format) with token F1 (SQuAD-style: lower case, accents and punctuation
  removed, English and Portuguese function words dropped, bag-of-tokens overlap), per model.
- `judge_definitions`: optionally, an LLM judge through any backend answers whether a definition conveys the
  gloss's meaning ("yes"/"no"); judgements are kept in an append-only store like predictions.
- `definition_rows` / `write_definition_report`: one row per model (size, number defined, mean token F1 with
  a bootstrap CI, judge accuracy), a markdown table and a plot of definition quality against model size.

The "larger model's definitions in a smaller model's prompt" condition is a sweep with `definitions` set to
a run's `definitions.jsonl` and `definitions_of` naming the larger model (see `SweepConfig`).
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idiomreason.backends.base import Backend
from idiomreason.prompts import Prompt, normalise_expression
from idiomreason.store import JsonlStore, read_records

FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for with and or but is are be been being it its this that as from into "
    "used use someone something one's oneself "  # English
    "o a os as um uma de do da dos das em no na nos nas por para com e ou que se ser é alguém algo".split()
)
JUDGE_SYSTEM = "You compare dictionary definitions of idioms."
JUDGE_USER = (
    'Reference definition of the expression "{expression}": {reference}\n\n'
    "Candidate definition: {candidate}\n\n"
    "Does the candidate convey the same meaning as the reference? Answer with one word: yes or no."
)


def _tokens(text: str) -> list[str]:
    decomposed = unicodedata.normalize("NFKD", text.lower())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return [t for t in re.findall(r"[a-z0-9]+", plain) if t not in FUNCTION_WORDS]


def token_f1(candidate: str, reference: str) -> float:
    """Bag-of-content-tokens F1 between a definition and its reference gloss (0 when either is empty)."""
    cand, ref = Counter(_tokens(candidate)), Counter(_tokens(reference))
    overlap = sum((cand & ref).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(cand.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def stored_definitions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's definitions.jsonl (model, template, expression, definition or None, ...)."""
    records = list(read_records(path, ("model", "template", "expression")).values())
    for record in records:
        if not all(isinstance(record.get(field), str) for field in ("model", "expression")):
            raise ValueError(
                f"{path}: {str(record)[:80]} is not a stored definition (needs text fields 'model' "
                "and 'expression'; a run's definitions.jsonl has them)"
            )
    return records


def score_definitions(records: Sequence[dict[str, Any]], glosses: dict[str, str]) -> list[dict[str, Any]]:
    """One scored item per stored definition whose expression has a gloss: model, expression, definition
    (None = the model gave none, scored 0), gloss and token F1."""
    items = []
    for record in records:
        gloss = glosses.get(normalise_expression(record["expression"]))
        if gloss is None:
            continue
        definition = record.get("definition")
        items.append(
            {
                "model": record["model"],
                "expression": record["expression"],
                "definition": definition,
                "gloss": gloss,
                "token_f1": token_f1(definition, gloss) if definition else 0.0,
            }
        )
    return items


def _yes_no(text: str) -> bool | None:
    from idiomreason.parsing import answer_region

    region = answer_region(text)
    words = re.findall(r"[a-z]+", (region or "").lower())
    for word in reversed(words):  # the last yes/no is the verdict ("... so the answer is yes")
        if word in ("yes", "no"):
            return word == "yes"
    return None


def _judge_prompt(item: dict[str, Any]) -> Prompt:
    user = JUDGE_USER.format(
        expression=item["expression"], reference=item["gloss"], candidate=item["definition"]
    )
    return Prompt(messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}])


def judge_definitions(
    items: Sequence[dict[str, Any]],
    backend: Backend,
    store: JsonlStore,
    *,
    judge: str,
    max_new_tokens: int = 512,
) -> list[dict[str, Any]]:
    """Ask `backend` (any backend: transformers, vLLM, HTTP) whether each definition means its gloss; store
    each judgement (keyed judge, model, expression) and return `items` with `judge_yes` (True / False /
    None = no definition or no verdict)."""
    todo = [it for it in items if it["definition"] and (judge, it["model"], it["expression"]) not in store]
    prompts = [_judge_prompt(it) for it in todo]
    for index, generation in backend.generate(prompts, max_new_tokens):
        it = todo[index]
        store.append([{"judge": judge, "model": it["model"], "expression": it["expression"],
                       "output": generation.text, "verdict": _yes_no(generation.text)}])  # fmt: skip
    out = []
    for it in items:
        record = store.get((judge, it["model"], it["expression"]))
        out.append({**it, "judge_yes": record["verdict"] if record is not None else None})
    return out


def judgement_store(path: str | Path) -> JsonlStore:
    return JsonlStore(path, ("judge", "model", "expression"))


def definition_rows(
    items: Sequence[dict[str, Any]], sizes: dict[str, float | None], n_resamples: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per model: n scored, n without a definition, mean token F1 [95% bootstrap CI], judge
    agreement (share of judged definitions the judge accepted) when judged."""
    rows = []
    for model in sorted({it["model"] for it in items}, key=lambda m: (sizes.get(m) or math.inf, m)):
        mine = [it for it in items if it["model"] == model]
        scores = [it["token_f1"] for it in mine]
        rng = random.Random(seed)
        means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(n_resamples))
        judged = [it["judge_yes"] for it in mine if it.get("judge_yes") is not None]
        rows.append({
            "model": model, "size_b": sizes.get(model), "n": len(mine),
            "n_no_definition": sum(1 for it in mine if not it["definition"]),
            "token_f1": sum(scores) / len(scores), "token_f1_lo": means[int(0.025 * n_resamples)],
            "token_f1_hi": means[min(n_resamples - 1, int(0.975 * n_resamples))],
            "n_judged": len(judged), "judge_accepts": sum(judged) / len(judged) if judged else math.nan,
        })  # fmt: skip
    return rows


def analyse_stored_definitions(
    definitions: str | Path,
    glosses: str | Path,
    out_dir: str | Path,
    sizes: dict[str, float | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    plot: bool = True,
) -> tuple[list[dict[str, Any]], Path, Path | None]:
    """The definition analysis of stored definitions alone (no models, no judge): a run's `definitions.jsonl`
    scored against a reference-glosses file (any `load_definitions` format); rows, the markdown and the plot.
    `sizes`: model -> billions of parameters (default: parsed from each model's name)."""
    from idiomreason.definitions import load_definitions
    from idiomreason.sweep import size_from_name

    items = score_definitions(stored_definitions(definitions), load_definitions(glosses))
    if not items:
        raise ValueError(f"no definition in {definitions} has a gloss in {glosses}: nothing to score")
    if sizes is None:
        sizes = {it["model"]: size_from_name(it["model"]) for it in items}
    rows = definition_rows(items, sizes, n_resamples, seed)
    md, png = write_definition_report(rows, out_dir, plot=plot)
    return rows, md, png


def write_definition_report(
    rows: Sequence[dict[str, Any]], out_dir: str | Path, plot: bool = True
) -> tuple[Path, Path | None]:
    """definition_quality.md and definition_quality_vs_size.png (token F1 and judge acceptance against
    model size, log scale; needs matplotlib, else no plot; `plot=False`: none)."""
    from shared_kernels.runconfig import write_text_atomic

    out_dir = Path(out_dir)
    lines = [
        "| model | size (B) | definitions scored | no definition | token F1 [95% CI] | judged "
        "| judge accepts |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        size = f"{r['size_b']:.3g}" if r["size_b"] else ""
        judge = "" if math.isnan(r["judge_accepts"]) else f"{r['judge_accepts']:.3f}"
        lines.append(
            f"| {r['model']} | {size} | {r['n']} | {r['n_no_definition']} | {r['token_f1']:.3f} "
            f"[{r['token_f1_lo']:.3f}, {r['token_f1_hi']:.3f}] | {r['n_judged']} | {judge} |"
        )
    lines += [
        "",
        "Token F1: content-word overlap of each generated definition with the reference gloss (a "
        "missing definition scores 0). Judge: share of definitions an LLM judge accepted as meaning the "
        "gloss.",
        "",
    ]
    md = out_dir / "definition_quality.md"
    write_text_atomic(md, "\n".join(lines))
    if not plot:
        return md, None
    sized = [r for r in rows if r["size_b"]]
    if not sized:
        return md, None
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return md, None
    return md, plot_definition_quality(sized, out_dir / "definition_quality_vs_size.png")


def plot_definition_quality(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Definition quality against model size (log scale): per model (one colour each, named in the legend)
    its mean token F1 with the 95% CI (circle) and, when judged, the judge's acceptance rate (square).
    Models of the same size are drawn slightly apart so their CIs do not hide each other."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from idiomreason.report import size_ticks
    from shared_kernels.runconfig import save_figure_atomic

    if len(rows) <= 10:
        colours = [plt.get_cmap("tab10")(i) for i in range(len(rows))]
    else:  # tab20's dark shades first, then the light ones: neighbours (often the same size) differ in hue
        colours = [plt.get_cmap("tab20")((2 * i) % 20 + (2 * i) // 20 % 2) for i in range(len(rows))]
    fig, ax = plt.subplots(figsize=(6, 4))
    handles = []
    for i, (r, x) in enumerate(zip(rows, _dodged_sizes([r["size_b"] for r in rows]))):
        colour = colours[i]
        yerr = [[r["token_f1"] - r["token_f1_lo"]], [r["token_f1_hi"] - r["token_f1"]]]
        ax.errorbar([x], [r["token_f1"]], yerr=yerr, fmt="o", color=colour, capsize=3)
        if not math.isnan(r["judge_accepts"]):
            ax.plot([x], [r["judge_accepts"]], "s", color=colour, markerfacecolor="none")
        handles.append(Line2D([], [], color=colour, marker="o", linestyle="", label=r["model"]))
    handles.append(
        Line2D([], [], color="black", marker="o", linestyle="", label="token F1 vs gloss (95% CI)")
    )
    if any(not math.isnan(r["judge_accepts"]) for r in rows):
        handles.append(
            Line2D(
                [],
                [],
                color="black",
                marker="s",
                markerfacecolor="none",
                linestyle="",
                label="LLM judge accepts",
            )
        )
    size_ticks(ax, [r["size_b"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_xlabel("parameters (billions, log scale)")
    ax.set_ylabel("definition quality (0-1)")
    ax.set_title("definition quality against model size")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=120, bbox_inches="tight")


def _dodged_sizes(sizes: Sequence[float], step: float = 0.03) -> list[float]:
    """`sizes` with the models that share a size spread `step` decades apart around it (log-scale x)."""
    from idiomreason.report import dodge_factor

    count = Counter(sizes)
    seen: Counter[float] = Counter()
    out = []
    for size in sizes:
        out.append(size * dodge_factor(seen[size], count[size], step))
        seen[size] += 1
    return out
