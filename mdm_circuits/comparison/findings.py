"""The paper's three findings, each judged by a rule fixed before any run (never tuned to an outcome).

All use the headline K and 95% bootstrap intervals (resampling each task's questions with its own weights; two
tasks' intervals are combined replicate by replicate, their resamples being independent). Overlaps and their
differences take the calibrated intervals of `structure.extrapolated_interval` / `extrapolated_difference`.

1. On IOI the MDM largely keeps the ARM's circuit. Supported when the ARM-MDM overlap's interval lies above the
   chance null (its 97.5th percentile) and the overlap is at least half the noise ceiling (the mean of the
   full-size paired label-swap null: the overlap sampling noise leaves between two models with one circuit);
   contradicted when the interval lies below half that ceiling.
2. On Countdown the MDM abandons inherited pathways, with more processing in early layers. Supported when the
   ARM-MDM overlap is lower on Countdown than on IOI (interval of the difference above 0) and the MDM's layer
   centre of mass on Countdown is below the ARM's (interval of the difference below 0); contradicted when
   either interval lies on the other side of 0.
3. The ARM relies on a few sharply specialised components, the MDM on distributed integration. Supported when,
   on IOI and on Countdown (or on every task run, if not both), the MDM's importance entropy exceeds the
   ARM's (interval of the difference above 0); contradicted when it is below on every one of them.
4. The change from ARM to MDM is larger than what further causal training or another adaptation seed brings
   (the controls). Supported when, on every task, the ARM-MDM overlap is below each control's overlap with
   its baseline (ARM vs continued ARM, MDM vs MDM seed 2: interval of the difference below 0); contradicted
   when, on every task, it is above at least one of them; not measured without controls.
Otherwise the run cannot tell. A finding whose tasks were not run, or whose contrast fails for the ARM or the
MDM (`analysis.validity`; such tasks are not passed to `judge`), is not measured.
"""

from __future__ import annotations

import numpy as np

from mdm_circuits.analysis.structure import extrapolated_difference, extrapolated_interval, interval

SUPPORTS, CONTRADICTS, CANNOT_TELL, NOT_MEASURED = "supports", "contradicts", "cannot tell", "not measured"
STATEMENTS = (
    "On IOI the MDM largely keeps the ARM's circuit (high edge overlap).",
    "On Countdown the MDM abandons inherited pathways, with more processing in early layers.",
    "The ARM relies on a few sharply specialised components, the MDM on distributed integration.",
    "The ARM → MDM change exceeds what further causal training or another adaptation seed brings.",
)


def _overlap(found: dict, replicates: dict, pair: tuple[str, str] = ("ARM", "MDM")
             ) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """The headline overlap of a pair and its replicates at full and at half size (for the calibrated
    intervals of `structure.extrapolated_interval` and `extrapolated_difference`)."""
    index, column = [tuple(p) for p in found["pairs"]].index(pair), found["ks"].index(found["headline_k"])
    return found["jaccard"]["point"][index][column], (replicates["jaccard_headline"][:, index],
                                                      replicates["jaccard_headline_halved"][:, index])


def _overlap_ci(values: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    low, high = extrapolated_interval(*values)
    return float(low), float(high)


def _difference_ci(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]
                   ) -> tuple[float, float]:
    low, high = extrapolated_difference(*first, *second)
    return float(low), float(high)


def _ci(values: np.ndarray) -> tuple[float, float]:
    low, high = interval(values)
    return float(low), float(high)


def _model(found: dict, name: str) -> int:
    return list(found["centre_of_mass"]).index(name)


def first(structures: dict, replicates: dict) -> dict:
    if "ioi" not in structures:
        return {"verdict": NOT_MEASURED, "evidence": "IOI was not run, or its contrast fails"}
    found = structures["ioi"]
    point, values = _overlap(found, replicates["ioi"])
    low, high = _overlap_ci(values)
    column = found["ks"].index(found["headline_k"])
    chance = found["null_random"]["high"][column]
    ceiling = float(found["null_label_swap"]["ARM vs MDM"]["mean"][column])
    if low > chance and point >= ceiling / 2:
        verdict = SUPPORTS
    elif high < ceiling / 2:
        verdict = CONTRADICTS
    else:
        verdict = CANNOT_TELL
    return {"verdict": verdict, "overlap": point, "interval": [low, high], "chance_97_5": chance,
            "noise_ceiling": ceiling,
            "evidence": f"IOI ARM-MDM overlap {point:.3f} [{low:.3f}, {high:.3f}] at K = {found['headline_k']}; "
                        f"chance up to {chance:.3f}; noise ceiling (label-swap null) {ceiling:.3f} (half of it: "
                        f"{ceiling / 2:.3f})"}


def second(structures: dict, replicates: dict) -> dict:
    if not {"ioi", "countdown"} <= set(structures):
        return {"verdict": NOT_MEASURED, "evidence": "needs both IOI and Countdown, run with contrasts that work"}
    ioi_point, ioi_values = _overlap(structures["ioi"], replicates["ioi"])
    count_point, count_values = _overlap(structures["countdown"], replicates["countdown"])
    drop, drop_ci = ioi_point - count_point, _difference_ci(ioi_values, count_values)
    found, values = structures["countdown"], replicates["countdown"]["centre_of_mass"]
    arm, mdm = _model(found, "ARM"), _model(found, "MDM")
    shift = found["centre_of_mass"]["MDM"]["point"] - found["centre_of_mass"]["ARM"]["point"]
    shift_ci = _ci(values[:, mdm] - values[:, arm])
    if drop_ci[0] > 0 and shift_ci[1] < 0:
        verdict = SUPPORTS
    elif drop_ci[1] < 0 or shift_ci[0] > 0:
        verdict = CONTRADICTS
    else:
        verdict = CANNOT_TELL
    return {"verdict": verdict, "overlap_drop": drop, "overlap_drop_interval": list(drop_ci),
            "centre_of_mass_shift": shift, "centre_of_mass_shift_interval": list(shift_ci),
            "evidence": f"ARM-MDM overlap IOI − Countdown {drop:+.3f} [{drop_ci[0]:+.3f}, {drop_ci[1]:+.3f}]; on "
                        f"Countdown the MDM's layer centre of mass minus the ARM's {shift:+.3f} "
                        f"[{shift_ci[0]:+.3f}, {shift_ci[1]:+.3f}] (negative: earlier)"}


def third(structures: dict, replicates: dict) -> dict:
    tasks = [t for t in ("ioi", "countdown") if t in structures] if {"ioi", "countdown"} <= set(structures) \
        else list(structures)
    if not tasks:
        return {"verdict": NOT_MEASURED, "evidence": "no task was run with a contrast that works"}
    rows = {}
    for task in tasks:
        found, values = structures[task], replicates[task]["entropy"]
        arm, mdm = _model(found, "ARM"), _model(found, "MDM")
        point = (found["specialisation"]["MDM"]["entropy"]["point"]
                 - found["specialisation"]["ARM"]["entropy"]["point"])
        rows[task] = (point, _ci(values[:, mdm] - values[:, arm]))
    if all(ci[0] > 0 for _, ci in rows.values()):
        verdict = SUPPORTS
    elif all(ci[1] < 0 for _, ci in rows.values()):
        verdict = CONTRADICTS
    else:
        verdict = CANNOT_TELL
    differences = {t: {"point": p, "interval": list(ci)} for t, (p, ci) in rows.items()}
    return {"verdict": verdict, "entropy_difference": differences,
            "evidence": "; ".join(f"{t}: MDM − ARM importance entropy {p:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
                                  for t, (p, ci) in rows.items())}


def fourth(structures: dict, replicates: dict, controls: list[tuple[str, str]]) -> dict:
    if not controls:
        return {"verdict": NOT_MEASURED, "evidence": "no control was run"}
    if not structures:
        return {"verdict": NOT_MEASURED, "evidence": "no task was run with a contrast that works"}
    rows, below, above = {}, [], []
    for task, found in structures.items():
        point, values = _overlap(found, replicates[task])
        rows[task] = {}
        for pair in controls:
            control_point, control_values = _overlap(found, replicates[task], pair)
            ci = _difference_ci(values, control_values)
            rows[task][f"{pair[0]} vs {pair[1]}"] = {"point": point - control_point, "interval": list(ci)}
        below.append(all(row["interval"][1] < 0 for row in rows[task].values()))
        above.append(any(row["interval"][0] > 0 for row in rows[task].values()))
    verdict = SUPPORTS if all(below) else CONTRADICTS if all(above) else CANNOT_TELL
    evidence = "; ".join(f"{task}: " + ", ".join(
        f"ARM-MDM minus {pair} overlap {row['point']:+.3f} [{row['interval'][0]:+.3f}, {row['interval'][1]:+.3f}]"
        for pair, row in by_pair.items()) for task, by_pair in rows.items())
    return {"verdict": verdict, "overlap_minus_control": rows, "evidence": evidence}


def judge(structures: dict, replicates: dict, controls: list[tuple[str, str]] = ()) -> list[dict]:
    """Each finding's statement, verdict and evidence. `controls`: the (baseline, control) pairs that the
    fourth finding sets beside ARM vs MDM."""
    rules = (first, second, third, lambda s, r: fourth(s, r, list(controls)))
    return [{"finding": statement} | rule(structures, replicates) for statement, rule in zip(STATEMENTS, rules)]
