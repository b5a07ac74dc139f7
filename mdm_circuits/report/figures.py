"""The report's figures, drawn with matplotlib (Agg, no screen) and returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLOURS = {"ARM": "#1f77b4", "MDM": "#d62728", "ARM as MDM": "#9467bd"}
OTHERS = ("#2ca02c", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def colour(name: str, names: list[str]) -> str:
    if name in COLOURS:
        return COLOURS[name]
    others = [n for n in names if n not in COLOURS]
    return OTHERS[others.index(name) % len(OTHERS)] if name in others else "#333333"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def overlaps(task: str, found: dict, highlighted: list[tuple[str, str]]) -> bytes:
    """Jaccard overlap against K: the chosen pairs with their 95% intervals, the chance null and each main
    model's split-half band."""
    ks = np.asarray(found["ks"])
    pairs = [tuple(p) for p in found["pairs"]]
    names = sorted({name for pair in pairs for name in pair})
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    null = found["null_random"]
    axis.fill_between(ks, null["low"], null["high"], color="#bbbbbb", alpha=0.5, hatch="//", edgecolor="#999999",
                      label="chance (random sets, 95%)")
    for name, style in (("ARM", ":"), ("MDM", "--")):
        band = found["null_split_half"][name]
        axis.fill_between(ks, band["low"], band["high"], color=colour(name, names), alpha=0.12)
        axis.plot(ks, band["mean"], style, color=colour(name, names), linewidth=1,
                  label=f"{name}: two halves of its pool")
    for a, b in highlighted:
        if (a, b) not in pairs:
            continue
        index = pairs.index((a, b))
        point, low, high = (np.asarray(found["jaccard"][key][index]) for key in ("point", "low", "high"))
        if (a, b) == ("ARM", "MDM"):
            line_colour, style, band = "black", "o-", "#e6b800"
        else:  # a control against the ARM (solid) or the MDM (dashed)
            other, reference = (b, a) if a in ("ARM", "MDM") else (a, b)
            line_colour, style = colour(other, names), "o-" if reference == "ARM" else "s--"
            band = line_colour
        axis.fill_between(ks, low, high, color=band, alpha=0.3 if band == "#e6b800" else 0.1)
        axis.plot(ks, point, style, color=line_colour, markersize=3, linewidth=1.2, label=f"{a} vs {b}")
    axis.axvline(found["headline_k"], color="#666666", linewidth=0.8, linestyle="-.")
    axis.set_xscale("log")
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("K (top edges by |score|)")
    axis.set_ylabel("Jaccard overlap of top-K edge sets")
    axis.set_title(f"{task}: circuit overlap against K (headline K = {found['headline_k']})")
    axis.legend(fontsize=7, loc="lower right")
    return _png(figure)


def layers(task: str, found: dict, names: list[str]) -> bytes:
    """The share of component importance in each layer, per model."""
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        shares = np.asarray(found["layers"][name])
        com = found["centre_of_mass"][name]
        axis.bar(np.arange(len(shares)) + (index - (len(names) - 1) / 2) * width, shares, width,
                 color=colour(name, names),
                 label=f"{name} (centre {com['point']:.2f} [{com['low']:.2f}, {com['high']:.2f}])")
    axis.set_xticks(np.arange(len(shares)))
    axis.set_xlabel("layer")
    axis.set_ylabel("share of importance s(v)")
    axis.set_title(f"{task}: importance over layers (input embedding apart)")
    axis.legend(fontsize=7)
    return _png(figure)


def specialisation(structures: dict, names: list[str]) -> bytes:
    """Importance entropy (1 = spread evenly over components) per task and model, with 95% intervals."""
    tasks = list(structures)
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        values = [structures[t]["specialisation"][name]["entropy"] for t in tasks]
        points = np.array([v["point"] for v in values])
        errors = np.array([[v["point"] - v["low"] for v in values], [v["high"] - v["point"] for v in values]])
        axis.bar(np.arange(len(tasks)) + (index - (len(names) - 1) / 2) * width, points, width,
                 yerr=np.clip(errors, 0, None), capsize=3, color=colour(name, names), label=name)
    axis.set_xticks(np.arange(len(tasks)), tasks)
    axis.set_ylabel("normalised entropy of s(v)")
    axis.set_ylim(0, 1.05)
    axis.set_title("Specialisation: low entropy = few sharp components, high = distributed")
    axis.legend(fontsize=7)
    return _png(figure)


def ablations(task: str, found: dict) -> bytes:
    """The share of the task kept when zeroing the important early components, without those shared by both
    models, random components and middle/late components (controls: mean, whiskers min to max)."""
    models = list(found["models"])
    labels = ["important early", "without shared", "random (same count)", "middle/late (same count)"]
    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    undefined = [name for name in models if not found["models"][name]["defined"]]
    models = [name for name in models if name not in undefined]  # no bar for a ratio without a denominator
    width = 0.8 / max(len(models), 1)
    for index, name in enumerate(models):
        result = found["models"][name]
        unshared = result["retained_without_shared"]
        values = [result["retained"], np.nan if unshared is None else unshared, result["random"]["mean"],
                  result["middle_late"]["mean"]]
        errors = [[0, 0, result["random"]["mean"] - result["random"]["min"],
                   result["middle_late"]["mean"] - result["middle_late"]["min"]],
                  [0, 0, result["random"]["max"] - result["random"]["mean"],
                   result["middle_late"]["max"] - result["middle_late"]["mean"]]]
        axis.bar(np.arange(4) + (index - (len(models) - 1) / 2) * width, values, width, yerr=errors, capsize=3,
                 color=colour(name, models), label=name)
    axis.axhline(1.0, color="#666666", linewidth=0.8)
    axis.axhline(0.0, color="#666666", linewidth=0.8)
    axis.set_xticks(np.arange(4), labels, fontsize=8)
    axis.set_ylabel("share of the task kept")
    title = f"{task}: zeroing {found['size']} components (early = first {found['early_layers']} layer(s))"
    if undefined:
        title += f"\nundefined (no clean − corrupted gap): {', '.join(undefined)}"
    axis.set_title(title, fontsize=9 if undefined else None)
    axis.legend(fontsize=7)
    return _png(figure)


def logit_lens(task: str, found: dict) -> bytes:
    """Each model's top components: what their direct contribution adds to the correct-minus-incorrect logit,
    labelled with the token they promote most."""
    models = list(found)
    figure, axes = plt.subplots(1, len(models), figsize=(3.3 * len(models), 3.2), squeeze=False)
    for axis, name in zip(axes[0], models):
        components = found[name]["components"]
        pushes = [c["answer_push"] for c in components]
        labels = [f"{c['component']} ({c['tokens'][0].strip() or repr(c['tokens'][0])})" for c in components]
        axis.barh(np.arange(len(pushes))[::-1], pushes, color=COLOURS.get(name, "#555555"))
        axis.set_yticks(np.arange(len(pushes))[::-1], labels, fontsize=7)
        axis.axvline(0, color="#666666", linewidth=0.8)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("direct push to correct − incorrect (logits)", fontsize=7)
    figure.suptitle(f"{task}: logit lens of the top components (most promoted token)", fontsize=9)
    return _png(figure)


def trajectory(structures: dict, accuracy: dict, steps: list[tuple[str, int]], end: int) -> bytes:
    """Along the adaptation: each checkpoint's overlap with the ARM and with the final MDM, its layer centre of
    mass, and its accuracy, per task."""
    tasks = list(structures)
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    names = [name for name, _ in steps] + ["MDM"]
    xs = [step for _, step in steps] + [end]
    for task_index, task in enumerate(tasks):
        found = structures[task]
        pairs = [tuple(p) for p in found["pairs"]]
        column = found["ks"].index(found["headline_k"])

        def overlap(a, b):
            if a == b:
                return 1.0
            pair = (a, b) if (a, b) in pairs else (b, a)
            return found["jaccard"]["point"][pairs.index(pair)][column]

        style = OTHERS[task_index % len(OTHERS)]
        axes[0].plot(xs, [overlap("ARM", n) for n in names], "o-", color=style, label=f"{task}: with ARM")
        axes[0].plot(xs, [overlap("MDM", n) for n in names], "s--", color=style, label=f"{task}: with MDM")
        axes[1].plot(xs, [found["centre_of_mass"][n]["point"] for n in names], "o-", color=style, label=task)
        axes[2].plot(xs, [accuracy[task][n] for n in names], "o-", color=style, label=task)
    axes[0].set_title("overlap at headline K", fontsize=9)
    axes[1].set_title("layer centre of mass (0 first, 1 last)", fontsize=9)
    axes[2].set_title("accuracy (MDM view)", fontsize=9)
    for axis in axes:
        axis.set_xlabel("adaptation step (0: ARM weights as MDM)", fontsize=8)
        axis.legend(fontsize=6)
    axes[0].set_ylim(0, 1.02)
    axes[2].set_ylim(0, 1.02)
    return _png(figure)


def _undefined_as_nan(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def faithfulness(task: str, found: dict, names: list[str]) -> bytes:
    """Each model's top-K faithfulness against K with its 95% band, a random circuit of every size (dotted) and
    tau; undefined points (no clean − corrupted gap) are left out."""
    ks = np.asarray(found["ks"])
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    for name in names:
        measured = found["models"][name]
        if not measured["defined"]:
            continue
        curve = measured["curve"]
        axis.fill_between(ks, _undefined_as_nan(curve["low"]), _undefined_as_nan(curve["high"]),
                          color=colour(name, names), alpha=0.12)
        axis.plot(ks, _undefined_as_nan(curve["point"]), "o-", color=colour(name, names), markersize=3,
                  linewidth=1.2, label=name)
        axis.plot(ks, _undefined_as_nan(measured["random"]["point"]), ":", color=colour(name, names), linewidth=1)
    axis.axhline(found["tau"], color="#666666", linewidth=0.8, linestyle="--", label=f"tau = {found['tau']}")
    axis.axhline(0.0, color="#999999", linewidth=0.6)
    axis.axvline(found["headline_k"], color="#666666", linewidth=0.8, linestyle="-.")
    axis.set_xscale("log")
    axis.set_xlabel("K (top edges by |score|)")
    axis.set_ylabel("faithfulness")
    axis.set_title(f"{task}: faithfulness of the top-K circuit (dotted: a random circuit of each size)")
    axis.legend(fontsize=7, loc="lower right")
    return _png(figure)


def agreement(task: str, found: dict, method: dict, exact: dict, label: str) -> bytes:
    """Per model, the method's edge scores against exact single-edge patching on the same questions (signed,
    symmetric-log axes), the exact top-K marked; edges not patched are left out."""
    names = list(found["models"])
    figure, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        measured = np.isfinite(exact[name])
        x, y = exact[name][measured], method[name][measured]
        top = np.zeros(len(x), bool)
        top[np.argsort(-np.abs(x), kind="stable")[: found["k"]]] = True
        axis.scatter(x[~top], y[~top], s=3, color="#aaaaaa", label="other edges")
        axis.scatter(x[top], y[top], s=4, color=colour(name, names), label=f"exact top {found['k']}")
        scale = max(np.abs(x).max(), np.abs(y).max(), 1e-12)
        for set_scale in (axis.set_xscale, axis.set_yscale):
            set_scale("symlog", linthresh=scale * 1e-3)
        values = found["models"][name]
        axis.set_title(f"{name}: rho {values['spearman']:.2f}, J@{found['k']} {values['jaccard']:.2f}", fontsize=9)
        axis.set_xlabel("exact patching (one edge at a time)", fontsize=8)
        axis.set_ylabel(label, fontsize=8)
        axis.legend(fontsize=6)
    figure.suptitle(f"{task}: attribution against exact patching on {len(found['questions'])} questions", fontsize=9)
    return _png(figure)
