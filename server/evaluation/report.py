"""The evaluation report: one self-contained HTML file (figures embedded), with PNGs and JSON beside it.

Laid out for a clinician or reviewer: the answer first. With external test sets, that is each
external set's result (the generalisation answer: paired differences between arm A and each
other arm on the same images, every arm's metrics, per site, per class), then the same for the
source's own test split; without, the source's. Then the heads' training: the chosen epochs and
the overfitting gap in the metric heads are selected on, the curves as in the paper's Figure 2
(loss, accuracy and the selection metric, one column per arm), the shortcut test, confusion
matrices, the pretraining history (the objective's loss per round, epsilon per site) and the
exact config. Every interval says what it covers.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.data.catalog import DataError  # noqa: E402
from common.privacy import classical_group_privacy  # noqa: E402
from common.run_folder import CONFIG_NAME, METRICS_NAME  # noqa: E402
from server.evaluation.arms import report_words, study_arm  # noqa: E402
from server.evaluation.metrics import METRICS_FORMAT  # noqa: E402

REPORT_NAME = "report.html"
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_auroc": "macro AUROC"}
COLOURS = {"train": "#1f77b4", "val": "#d62728"}


def _undefined(ci: dict) -> str:
    """How many bootstrap replicates left the metric undefined (e.g. drew one class only), when any did."""
    return f" ({ci['undefined']} of {ci['replicates']} replicates undefined)" if ci.get("undefined") else ""


def _fmt(ci: Optional[dict], digits: int = 3) -> str:
    """A bootstrap interval: mean [low, high], and how many replicates were undefined."""
    if not ci or ci.get("mean") is None:
        return "n/a"
    if ci["n"] < 2:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]{_undefined(ci)}"


def _fmt_recall(ci: Optional[dict]) -> str:
    """A class's recall with its bootstrap interval over test lesions, and how many images and lesions it rests on."""
    if not ci or ci.get("mean") is None:
        return "n/a"
    return f"{_fmt(ci, 2)}; {ci.get('images', '?')} images, {ci.get('lesions', '?')} lesions"


def _fmt_spread(spread: Optional[dict]) -> str:
    """The spread over head seeds only: mean (seeds: lowest to highest)."""
    if not spread or spread.get("mean") is None:
        return "n/a"
    if spread["n"] < 2:
        return f"{spread['mean']:+.3f} (one seed)"
    return f"{spread['mean']:+.3f} (seeds: {spread['min']:+.3f} to {spread['max']:+.3f})"


def _fmt_diff(diff: dict) -> str:
    if diff.get("mean") is None:
        return "n/a"
    return f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"


def _overlap(counts: dict) -> str:
    """Pretraining images in train / val / test, then other images of pretrained lesions in val / test."""
    if "source" not in counts:  # several split seeds: one entry each
        return "; ".join(f"split {seed}: {_overlap(c)}" for seed, c in counts.items())
    if counts.get("pretraining_images") is None:
        return f"not known ({counts.get('source', '')})"
    images = f"{counts['train']} / {counts['val']} / {counts['test']}"
    if counts.get("pretraining_groups") is None:
        return f"{images}; lesions not recorded"
    return f"{images}; same lesion: {counts.get('val_same_lesion')} / {counts.get('test_same_lesion')}"


def _external_overlap(counts: dict) -> str:
    if counts.get("pretraining_images") is None:
        return f"not known ({counts.get('source', '')})"
    lesions = "lesions not recorded" if counts.get("pretraining_groups") is None else f"same lesion: {counts['test_same_lesion']}"
    return f"{counts['test']}; {lesions}"


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


CURVE_ROWS = (("loss", "cross-entropy loss"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"))
SELECTED = {"val_balanced_accuracy": "balanced_accuracy", "val_loss": "loss"}


def figure_curves(arms: list[dict], select_on: str, path: Path) -> Path:
    """Figure 2 layout plus the selection metric: loss, accuracy and balanced accuracy (rows), one column per arm,
    training vs validation; dotted lines at the epochs the head seeds chose."""
    selected = SELECTED.get(select_on, "balanced_accuracy")
    figure, axes = plt.subplots(len(CURVE_ROWS), len(arms), figsize=(4.2 * len(arms), 9.0), squeeze=False, sharex=True)
    for column, arm in enumerate(arms):
        curves = arm["curves"]
        epochs = np.array(curves["epoch"])
        for row, (metric, name) in enumerate(CURVE_ROWS):
            axis = axes[row][column]
            for split in ("train", "val"):
                mean = np.array(curves[f"{split}_{metric}"])
                std = np.array(curves[f"{split}_{metric}_std"])
                axis.plot(epochs, mean, color=COLOURS[split], label="training" if split == "train" else "validation")
                axis.fill_between(epochs, mean - std, mean + std, color=COLOURS[split], alpha=0.15)
            for epoch in sorted({s["best_epoch"] for s in arm["seeds"]}):
                axis.axvline(epoch, color="#555", linestyle=":", linewidth=0.9)
            axis.set_ylabel(f"{name}\n(selects the epoch)" if metric == selected else name)
            axis.grid(alpha=0.3)
            if row == 0:
                axis.set_title(arm["label"], fontsize=9)
            if row == len(CURVE_ROWS) - 1:
                axis.set_xlabel("epoch (dotted: chosen epochs)")
        axes[0][column].legend(fontsize=8)
    return _save(figure, path)


def figure_gap(arms: list[dict], select_on: str, path: Path) -> Path:
    """The overfitting gap per epoch in the selection metric, all arms together."""
    selected = SELECTED.get(select_on, "balanced_accuracy")
    figure, axis = plt.subplots(figsize=(7, 3.6))
    for arm in arms:
        curves = arm["curves"]
        axis.plot(curves["epoch"], curves[f"gap_{selected}"], label=arm["label"])
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation - training loss" if selected == "loss" else f"training - validation\n{METRIC_NAMES[selected]}")
    axis.set_title(f"Overfitting gap in {'the loss' if selected == 'loss' else METRIC_NAMES[selected]} (heads are selected on it)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, path)


def figure_confusion(arms: list[dict], classes: list[str], path: Path) -> Path:
    figure, axes = plt.subplots(1, len(arms), figsize=(3.8 * len(arms), 3.6), squeeze=False)
    for axis, arm in zip(axes[0], arms):
        matrix = np.array(arm["confusion_matrix"], dtype=float)
        normalised = matrix / np.clip(matrix.sum(axis=1, keepdims=True), 1, None)
        axis.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                axis.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                          color="white" if normalised[i, j] > 0.5 else "black")
        axis.set_xticks(range(len(classes)), classes, rotation=45, fontsize=8)
        axis.set_yticks(range(len(classes)), classes, fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(arm["label"], fontsize=9)
    return _save(figure, path)


def _series(values: list[Optional[float]]) -> Optional[list[float]]:
    return [np.nan if v is None else v for v in values] if any(v is not None for v in values) else None


def _lines_figure(x: list, lines: dict[str, Optional[list[float]]], title: str, xlabel: str, path: Path) -> Optional[Path]:
    """One line per series that has a value; None when no series has one (nothing to draw)."""
    lines = {label: values for label, values in lines.items() if values is not None}
    if not lines:
        return None
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for label, values in lines.items():
        axis.plot(x, values, marker="o", label=label)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _history_axis(history: list[dict]) -> tuple[bool, list[int], str]:
    """A federated history is per round, a pooled or local one per epoch."""
    federated = "round" in history[0]
    unit = "round" if federated else "epoch"
    return federated, [h[unit] for h in history], unit


def figure_pretraining_loss(history: list[dict], path: Path, loss: str = "reconstruction") -> Optional[Path]:
    """The objective's headline loss (`loss`: its first term, e.g. the VAE's reconstruction) per round (federated) or
    epoch (pooled/local); None when none was reported (DP sites send none)."""
    if not history:
        return None
    federated, x, unit = _history_axis(history)
    lines = {}
    if federated:
        lines["training (sites, weighted)"] = _series([h["train"].get(loss) for h in history])
        lines["validation (sites)"] = _series([h.get("evaluate", {}).get(f"val-{loss}") for h in history])
    else:
        lines["training"] = _series([h.get(loss) for h in history])
    return _lines_figure(x, lines, f"Pretraining: {loss} loss per image", unit, path)


def figure_privacy(history: list[dict], path: Path) -> Optional[Path]:
    """Epsilon spent per site and round; None without DP-SGD (there is nothing to draw)."""
    if not history:
        return None
    federated, x, unit = _history_axis(history)
    lines = {}
    if federated:
        for site in sorted({s["site"] for h in history for s in h["sites"]}):
            lines[site] = _series([next((s.get("epsilon") for s in h["sites"] if s["site"] == site), None) for h in history])
    else:
        lines["pooled"] = _series([h.get("epsilon") for h in history])
    return _lines_figure(x, lines, "Privacy spent per site (epsilon)", unit, path)


def privacy_table(history: list[dict], max_per_lesion: Optional[int]) -> str:
    """Each site's final epsilon per image, and what it gives a lesion of k images (group privacy)."""
    if not history:
        return ""
    federated = "round" in history[0]
    finals: dict[str, tuple[float, float]] = {}
    for entry in history:
        for site in entry["sites"] if federated else [{"site": "pooled", **entry}]:
            if site.get("epsilon") is not None and site.get("delta"):
                finals[site["site"]] = (float(site["epsilon"]), float(site["delta"]))
    if not finals:
        return ""
    sizes = sorted({2, *([max_per_lesion] if max_per_lesion and max_per_lesion > 2 else [])})

    def group(eps: float, delta: float, k: int) -> str:
        group_eps, group_delta = classical_group_privacy(eps, delta, k)
        return f"{group_eps:.3g} at delta {group_delta:.2g}" if group_delta < 1 else f"none (delta {group_delta:.2g} >= 1)"

    rows = [[site, f"{eps:.3g}", f"{delta:g}", *[group(eps, delta, k) for k in sizes]]
            for site, (eps, delta) in sorted(finals.items())]
    return ('<p>DP-SGD protects each image. A lesion photographed k times is protected as a group, with the weaker '
            "guarantee of (epsilon, delta)-DP group privacy: (k epsilon, k e<sup>(k-1) epsilon</sup> delta). "
            f"k = {sizes[-1]} is the most images of one lesion in these data.</p>"
            + _table(["site", "epsilon per image", "delta", *[f"lesion of {k} images" for k in sizes]], rows, "privacy"))


def _embed(path: Optional[Path], alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.35em .6em;text-align:left}
th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:.85em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.8em}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}
.muted{color:#666;font-size:.9em}.caption{color:#333;font-size:.9em;background:#f7f7f7;padding:.6em 1em}
"""


def _comparisons_html(arms: list[dict], comparisons: list[dict], replicates: Any, where: str, split_seeds: list) -> str:
    """The paired differences on one test set: verdicts in words, then the table."""
    labels = {arm["key"]: arm["label"] for arm in arms}
    seeds, per_split = _seeds_words(split_seeds)
    rows = [[f"{labels[c['a']]} minus {labels[c['b']]}", METRIC_NAMES.get(c["metric"], c["metric"]), _fmt_diff(c),
             f"no verdict: {c['withheld']}" if c.get("withheld") else "yes" if c["excludes_zero"] else "no",
             "" if c.get("p_holm") is None else f"{c['p_holm']:.3f}" + (" (holds)" if c["holds_after_correction"] else "")]
            for c in comparisons]
    verdicts = "".join(f"<li>{html.escape(c['words'])}</li>" for c in comparisons)
    caveats = sorted({caveat for c in comparisons for caveat in c.get("caveats", [])})
    qualified = "".join(f'<p class="note"><b>Qualified verdicts.</b> {html.escape(c)}.</p>' for c in caveats)
    withheld = sorted({c["withheld"] for c in comparisons if c.get("withheld")})
    too_few = "".join(f'<p class="note"><b>No verdict.</b> {html.escape(w)}: the intervals are shown, but they cannot '
                      "decide which arm is better.</p>" for w in withheld)
    return f"""<p>Each row compares two arms on the <em>same</em> {html.escape(where)}: the difference of their metric (mean over
{html.escape(seeds)}) and its 95% interval from a paired bootstrap ({replicates} replicates{html.escape(per_split)}) that redraws
these test lesions (or patients; an image without either alone) with replacement and, for each arm, its head seeds. An interval
that excludes 0 is a difference these test images support; one that includes 0 is not, whatever the two means. With several
comparisons, some intervals exclude 0 by chance alone (6 comparisons of arms that do not differ: up to one report in four), so a
verdict also needs its p-value, adjusted by Holm's method over every comparison on these test images, below 0.05.</p>
{too_few}
{qualified}
<ul class="verdicts">{verdicts}</ul>
{_table(["comparison", "metric", "difference [95% bootstrap interval]", "interval excludes 0",
          "p, Holm-adjusted over these comparisons"], rows, "comparisons")}"""


def _seeds_words(split_seeds: list) -> tuple[str, str]:
    """What the means and intervals average over: head seeds, and the split seeds when there are several."""
    if len(split_seeds) > 1:
        return (f"head seeds and the {len(split_seeds)} split seeds {split_seeds}",
                " per split seed, pooled: the interval covers redrawing the split too")
    return "head seeds (one split: the interval does not cover redrawing the split)", ""


def _scored_html(arms: list[dict], classes: list[str], title: str, overlap_header: str, overlap_cell: Any,
                 overlap_note: str) -> str:
    """Every arm's metrics on one test set: pooled, per site, per class."""
    final_rows = [[arm["label"], _fmt(arm["summary"]["accuracy"]), _fmt(arm["summary"]["balanced_accuracy"]),
                   _fmt(arm["summary"]["macro_auroc"]), overlap_cell(arm)] for arm in arms]
    site_rows = [[site, values.get("n", ""), ", ".join(values.get("classes_present", [])), arm["label"],
                  _fmt(values["balanced_accuracy"]), _fmt(values["accuracy"]), _fmt(values["macro_auroc"])]
                 for arm in arms for site, values in arm["per_site"].items()]
    recall_rows = [[arm["label"], *[_fmt_recall(arm["per_class_recall"][c]) for c in classes]] for arm in arms]
    undecided = [f"{arm['label']}: {arm['undecided']}" for arm in arms if arm.get("undecided")]
    undecided_note = (f"<p>Undecided predictions (the highest probability shared by two or more classes; the ISIC scorer "
                      f"counts them wrong), summed over seeds: {html.escape('; '.join(undecided))}.</p>" if undecided else "")
    return f"""<h3>{html.escape(title)}</h3>
<p>Mean over head seeds, with the 95% bootstrap interval over these test lesions (or patients) and the head seeds. Balanced
accuracy (mean recall over the classes present) and macro AUROC (mean one-vs-rest AUROC over the classes present, on the raw
probabilities) are the ISIC challenge scorer's definitions.</p>
{_table(["arm", "accuracy", "balanced accuracy", "macro AUROC", overlap_header], final_rows, "final")}
<p>{overlap_note}</p>
<h3>Per-site results</h3>
<p>Metrics over each site's test images, averaged over the classes present there (listed); intervals as above.</p>
{_table(["site", "test images", "classes present", "arm", "balanced accuracy", "accuracy", "macro AUROC"], site_rows)}
<h3>Per-class recall</h3>
<p>Recall of each class, averaged over head seeds, with its 95% bootstrap interval over the test lesions (or patients) and head
seeds: the images of one lesion are resampled together, as for every metric here. A class with few lesions has a wide interval;
where many replicates drew none of its lesions their number is given, and the interval rests on the others.</p>
{_table(["arm", *classes], recall_rows, "recall")}
{undecided_note}"""


SOURCE_OVERLAP_NOTE = (
    "The last column counts the arm's pretraining images in the evaluation's train / validation / test splits (validation "
    "and test must be 0; images are compared by file stem, case-insensitive, whatever format read them), then the validation "
    "and test images it did not pretrain on whose lesion (or patient) it pretrained on through another image (must be 0).")
EXTERNAL_OVERLAP_NOTE = (
    "The last column counts the arm's pretraining images found in this set (must be 0; compared by file stem, "
    "case-insensitive), then this set's images whose lesion (or patient) the arm pretrained on through another image (must be 0).")


def _gap_caption(metric: str) -> str:
    name = "loss (validation minus training)" if metric == "loss" else f"{METRIC_NAMES[metric]} (training minus validation)"
    return f"""<p class="caption">The overfitting gap is the head's {html.escape(name)}, in the metric the heads are
selected on, at each seed's chosen epoch and at its last epoch: the mean, with the lowest and highest over head seeds (only the
seeds vary it, so this is their spread, not a confidence interval). <b>What it can mean:</b> how much better the head fits this
arm's frozen features on its training images than on held-out ones; the gap at the chosen epoch is the one of the heads that are
scored. <b>What it cannot mean on its own:</b> which encoder generalises better. A head can fit its training images more closely
and still do better on new ones, and the last epoch's gap belongs to heads nobody scores: on the real HAM10000 sample (issue 19)
random init had the larger last-epoch accuracy gap (0.373 against 0.187 for the VAE encoder) and the higher balanced accuracy,
while at each head's chosen epoch the gaps were equal (0.128 and 0.130). Compare encoders by the test metrics and the paired
differences.</p>"""


def write_report(run_dir: Path, metrics: Optional[dict[str, Any]] = None) -> Path:
    """Write report.html and its PNGs into `run_dir` (reads metrics.json when not given)."""
    run_dir = Path(run_dir)
    if metrics is None:
        source = run_dir / METRICS_NAME
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found: run `dermfed evaluate` first")
        try:
            metrics = json.loads(source.read_text())
        except (ValueError, OSError) as exc:  # truncated, not JSON, not UTF-8, unreadable
            raise DataError(f"{source} is not a readable metrics.json ({type(exc).__name__}: {exc}); it was cut short or "
                            "is not `dermfed evaluate`'s: run `dermfed evaluate` again") from None
        if not isinstance(metrics, dict):
            raise DataError(f"{source} holds a JSON {type(metrics).__name__}, not `dermfed evaluate`'s metrics: run "
                            "`dermfed evaluate` again")
        if metrics.get("format") != METRICS_FORMAT:
            raise DataError(f"{source} was written by an older `dermfed evaluate` or another program (format "
                            f"{metrics.get('format', 'v1')!r}, expected {METRICS_FORMAT!r}); it lacks what this report shows "
                            "(each arm's provenance, what each interval covers): run `dermfed evaluate` again")
        try:
            return _write_report(run_dir, metrics)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise DataError(f"{source} says format {METRICS_FORMAT} but lacks or garbles what the report needs "
                            f"({type(exc).__name__}: {exc}): run `dermfed evaluate` again") from None
    return _write_report(run_dir, metrics)


def _write_report(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """The report of `metrics` (as `dermfed evaluate` writes them) into `run_dir`."""
    figures = run_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    arms, data, head = metrics["arms"], metrics["data"], metrics["head"]
    classes = data["classes"]
    select_on = head.get("select_on", "val_balanced_accuracy")
    selected = SELECTED.get(select_on, "balanced_accuracy")
    curves = figure_curves(arms, select_on, figures / "curves.png")
    gap = figure_gap(arms, select_on, figures / "overfitting_gap.png")
    confusion = figure_confusion(arms, classes, figures / "confusion_matrices.png")
    history = metrics["pretraining"]["history"]
    loss_name = metrics["pretraining"].get("loss", "reconstruction")  # metrics.json before objectives: the VAE's
    loss = figure_pretraining_loss(history, figures / "pretraining_loss.png", loss_name)
    privacy = figure_privacy(history, figures / "privacy.png")
    replicates = head.get("bootstrap_replicates", "")
    split_seeds = list(data.get("split_seeds") or [])
    seeds_words, _ = _seeds_words(split_seeds)
    reference = next((arm for arm in arms if arm["key"] == study_arm()), None)  # arm A, wherever evaluation.arms put it
    evaluated = reference is not None and metrics["pretraining"].get("evaluated", True)

    external_html = ""
    for number, (name, ext) in enumerate(metrics.get("external", {}).items()):
        matrices = figure_confusion(ext["arms"], classes, figures / f"confusion_matrices_external_{number}.png")
        excluded = ", ".join(f"{k}: {v}" for k, v in ext["excluded_classes"].items()) or "none"
        skipped_images = ", ".join(f"{k}: {v}" for k, v in ext["skipped"].items()) or "none"
        external_html += f"""
<h2>The answer: generalisation to external test set {html.escape(name)}</h2>
<p>{ext['images']} images ({html.escape(ext['format'])} at <code>{html.escape(str(ext['root']))}</code>; {ext['groups']}
lesions or patients; sites {html.escape(', '.join(ext['sites']))}; classes present {html.escape(', '.join(ext['classes_present']))}).
Every image of this set is test data: the heads were trained and selected on the source's training and validation splits only,
and no image here shares an identity or a lesion with the source. The bootstrap resamples {html.escape(ext['resampled'])}.
Images of classes the heads were not trained on are excluded, not scored: {html.escape(excluded)}. Images that could not be used:
{html.escape(skipped_images)}.</p>
{_comparisons_html(ext['arms'], ext['comparisons'], replicates, f"images of {name}", split_seeds)}
{_scored_html(ext['arms'], classes, f"Test metrics on {name}", "pretraining images here; same lesion",
              lambda arm: _external_overlap(arm["pretraining_overlap"]), EXTERNAL_OVERLAP_NOTE)}
{_embed(matrices, f"Confusion matrices on {name}, summed over seeds (colour: row-normalised)")}"""
    source_title = ("In distribution: the source's test split" if external_html
                    else "The answer: paired differences")
    training_rows = [[arm["label"], ", ".join(str(s["best_epoch"]) for s in arm["seeds"]),
                      _fmt_spread(arm["gap"]["at_chosen_epoch"]), _fmt_spread(arm["gap"]["at_last_epoch"])] for arm in arms]
    shortcut_html = ""
    if data.get("shortcut"):
        sc = data["shortcut"]
        rows = [[arm["label"], _fmt(arm["shortcut"]["artefact_matches_class"]), _fmt(arm["shortcut"]["artefact_mismatches_class"])]
                for arm in arms]
        shortcut_html = (f"<h2>Shortcut test</h2><p>In the training and validation images the non-clinical artefact "
                         f"<b>{html.escape(sc['artifact'])}</b> tracks class <b>{html.escape(sc['class'])}</b>; in the test "
                         "images it does not. An encoder whose features carry the artefact rather than the lesion loses "
                         "accuracy on the test images where artefact and class disagree. Intervals: bootstrap over test "
                         "lesions and head seeds.</p>"
                         + _table(["arm", "test accuracy, artefact agrees with class", "test accuracy, artefact disagrees"], rows))
    skipped = "".join(f'<p class="note"><b>Arm {html.escape(k)} did not run.</b> {html.escape(v)}</p>'
                      for k, v in metrics.get("skipped_arms", {}).items())
    privacy_html = (_embed(privacy, "Privacy budget (epsilon) spent per site during pretraining")
                    + privacy_table(history, data.get("max_images_per_lesion")) if privacy else
                    '<p class="note"><b>DP-SGD off.</b> This encoder was pretrained without differential privacy: its '
                    "updates carry no formal privacy guarantee.</p>")
    loss_html = _embed(loss, f"{loss_name.capitalize()} loss during pretraining") if loss else (
        f'<p class="muted">No {html.escape(loss_name)} loss was reported: under DP-SGD the sites send only their privacy '
        'status.</p>')
    pretraining_html = (f"""<h2>Pretraining history of arm A</h2>
<p>{html.escape(reference['label'] if reference else '')}, {html.escape(metrics['pretraining']['encoder'])} from
<code>{html.escape(metrics['checkpoint'])}</code> ({html.escape(json.dumps(metrics['pretraining']['position']))}).</p>
""" + loss_html + privacy_html if evaluated else
                        '<h2>Pretraining history</h2><p class="muted">Arm A (<code>--checkpoint</code>) was not evaluated '
                        f"(evaluation.arms={html.escape(str(head.get('arms')))}, or it did not run), so its pretraining "
                        "is not shown.</p>")
    config_text = (run_dir / CONFIG_NAME).read_text() if (run_dir / CONFIG_NAME).is_file() else json.dumps(head, indent=1)
    position = metrics["pretraining"]["position"]
    gap_name = "validation minus training loss" if selected == "loss" else f"training minus validation {METRIC_NAMES[selected]}"
    body = f"""
<h1>DermFed evaluation report</h1>
<p class="muted">{(f"The encoder under study, arm {html.escape(reference['label'])}, {html.escape(metrics['pretraining']['encoder'])} "
  f"from <code>{html.escape(metrics['checkpoint'])}</code> ({html.escape(json.dumps(position))}).") if evaluated else
 "The encoder under study (arm A, <code>--checkpoint</code>) was not evaluated; the arms below are compared with "
 f"{html.escape(arms[0]['label']) if arms else 'none'}."}
Source (heads trained, selected and first tested here): {html.escape(data['format'])} at <code>{html.escape(str(data['root']))}</code>,
{data['image_size']}x{data['image_size']} px, classes {html.escape(', '.join(classes))}; split sizes {html.escape(json.dumps(data['split_sizes']))}
({data.get('test_groups', '?')} test lesions; split seeds {html.escape(str(data.get('split_seeds', [])))}).
External test sets: {html.escape(', '.join(metrics.get('external', {})) or 'none')}.
Every arm is a frozen encoder feeding the same {html.escape(head['head'])} head ({head['epochs']} epochs, lr {head['lr']},
imbalance: {html.escape(head['imbalance'])}), trained with head seeds {html.escape(str(head['seeds']))}.</p>
<p class="muted">Intervals: <b>[low, high]</b> after a metric, per-class recall included, is a 95% bootstrap interval over the
test lesions (or patients; the images of one lesion are drawn together) and the head seeds; means are over
{html.escape(seeds_words)}. <b>(seeds: low to high)</b> is the spread over {"head and split seeds" if len(split_seeds) > 1 else
"head seeds"} only, not a confidence interval. With fewer than {head.get('min_test_groups', '?')} test lesions
(evaluation.min_test_groups) the report gives intervals but no verdict.</p>
{skipped}
{external_html}
<h2>{html.escape(source_title)}</h2>
{_comparisons_html(arms, metrics.get("comparisons", []), replicates, "test images of the source", split_seeds)}
{_scored_html(arms, classes, "Final test metrics", "pretraining images in train / val / test; same lesion in val / test",
              lambda arm: _overlap(arm["pretraining_overlap"]), SOURCE_OVERLAP_NOTE)}
{_embed(confusion, "Confusion matrices on the source's test set, summed over seeds (colour: row-normalised)")}
<h2>Head training: chosen epochs and the overfitting gap</h2>
<p>Each seed's best epoch was chosen on the source's validation data ({html.escape(select_on)}), never on test data.</p>
{_table(["arm", "chosen epoch per seed", f"gap at chosen epoch ({gap_name})", f"gap at last epoch ({gap_name})"],
        training_rows, "training")}
{_gap_caption(selected)}
<h2>Training dynamics (as in the paper's Figure 2)</h2>
<p>Top: the head's loss; then accuracy; then balanced accuracy; blue training, red validation; bands are one standard deviation
over seeds; dotted lines mark the epochs the seeds chose (on {html.escape(select_on)}, the row marked "selects the epoch").</p>
{_embed(curves, "Loss, accuracy and balanced accuracy per epoch, one column per arm")}
{_embed(gap, "Overfitting gap per epoch, in the metric heads are selected on")}
{shortcut_html}
{pretraining_html}
<h2>How to read this report</h2>
<ul>
<li>Start with the paired differences, on the external test sets first when there are any (the generalisation answer), then on
the source's test split. An interval that includes 0 means no difference was shown, even if one mean is higher. A verdict about
an arm whose pretraining images are not known is qualified: they could not be checked against the test images.</li>
<li>The arms: {html.escape("; ".join(report_words([arm["key"] for arm in arms])))}.</li>
<li>The overfitting gap alone does not rank encoders (see its caption); the test metrics and paired differences do.</li>
<li>Epsilon is the privacy budget each site spent (with delta in the config); without DP-SGD there is no formal guarantee.</li>
</ul>
<h2>Exact configuration</h2>
<pre>{html.escape(config_text)}</pre>
"""
    page = f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>DermFed evaluation report</title><style>{STYLE}</style></head><body>{body}</body></html>'
    path = run_dir / REPORT_NAME
    path.write_text(page)
    return path
