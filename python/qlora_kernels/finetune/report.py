"""The finetune job's figures: the summary of every side (tokens/s, memory, losses), the
table it prints and the plot it saves. A side is one configuration: "stock", "patched" (every
part on) and, with `--parts`, "patched -<part>" (every part on but that one)."""

from __future__ import annotations

from pathlib import Path

from .presets import without

RATIO_KEYS = ("tokens_per_s", "tokens_per_s_median_step", "peak_mb", "peak_above_start_mb")


def _tokens_per_s(result: dict, tokens_per_step: int, warmup: int) -> float | None:
    timed = result["step_s"][warmup:]
    return tokens_per_step * len(timed) / sum(timed) if timed and sum(timed) > 0 else None


def _ratios(num: dict, den: dict) -> dict:
    return {k: num[k] / den[k] if num[k] is not None and den[k] else None for k in RATIO_KEYS}


def summarize(results: dict, tokens_per_step: int, warmup: int, parts: tuple[str, ...] | None = None) -> dict:
    """Per side: tokens/s, peak memory, first and final loss. With stock and patched: their
    ratios ("patched_over_stock"); with parts: every side against stock ("over_stock") and
    each part's effect, every part on against every part on but that one ("part_effect":
    tokens/s ratio above 1 = the part speeds the step up, peak ratio below 1 = it saves memory)."""
    summary = {}
    for side, r in results.items():
        timed = sorted(r["step_s"][warmup:])
        median = timed[len(timed) // 2] if len(timed) % 2 else sum(timed[len(timed) // 2 - 1:][:2]) / 2
        summary[side] = {"tokens_per_s": _tokens_per_s(r, tokens_per_step, warmup),
                         "tokens_per_s_median_step": tokens_per_step / median if median > 0 else None,
                         "peak_mb": r["peak_mb"], "peak_above_start_mb": r["peak_above_start_mb"],
                         "first_loss": r["losses"][0], "final_loss": r["losses"][-1], "load_s": r["load_s"],
                         "steps_over_3x_median": sum(t > 3 * median for t in timed)}
    if "stock" in results and "patched" in results:
        s, p = summary["stock"], summary["patched"]
        summary["patched_over_stock"] = _ratios(p, s)
        summary["first_loss_rel_diff"] = abs(p["first_loss"] - s["first_loss"]) / abs(s["first_loss"])
        summary["final_loss_gap"] = p["final_loss"] - s["final_loss"]
        summary["same_lora_init"] = len({r["lora_init_checksum"] for r in results.values()}) == 1
    if parts is not None:
        summary["over_stock"] = {side: dict(_ratios(summary[side], summary["stock"]),
                                            first_loss_rel_diff=abs(summary[side]["first_loss"] - summary["stock"][
                                                "first_loss"]) / abs(summary["stock"]["first_loss"]),
                                            final_loss_gap=summary[side]["final_loss"] - summary["stock"]["final_loss"])
                                 for side in results if side != "stock"}
        summary["part_effect"] = {part: _ratios(summary["patched"], summary[without(part)]) for part in parts}
    return summary


def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _ratio_row(label: str, r: dict, first_loss_rel_diff: float | None, final_loss_gap: float | None,
               width: int) -> str:
    return (f"{label:<{width}}{_x(r['tokens_per_s']):>11}{_x(r['tokens_per_s_median_step']):>9}{_x(r['peak_mb']):>11}"
            f"{_x(r['peak_above_start_mb']):>13}"
            + (f"{first_loss_rel_diff:>12.1e}{final_loss_gap:>+12.5f}" if first_loss_rel_diff is not None else ""))


def format_table(summary: dict, memory_label: str) -> str:
    sides = [k for k, v in summary.items() if isinstance(v, dict) and "first_loss" in v]
    labels = [*sides, *(f"{side}/stock" for side in summary.get("over_stock", ()))]
    width = max(16, *(len(label) + 2 for label in labels))
    rows = [f"{'':<{width}}{'tokens/s':>11}{'median':>9}{'peak MB':>11}{'+MB in loop':>13}"
            f"{'first loss':>12}{'final loss':>12}"]
    for side in sides[:2] if "patched_over_stock" in summary else sides:
        s = summary[side]
        rows.append(f"{side:<{width}}{_num(s['tokens_per_s'], '11.1f')}{_num(s['tokens_per_s_median_step'], '9.1f')}"
                    f"{_num(s['peak_mb'], '11.0f')}"
                    f"{_num(s['peak_above_start_mb'], '13.0f')}{s['first_loss']:>12.5f}{s['final_loss']:>12.5f}")
    if "patched_over_stock" in summary:
        rows.append(_ratio_row("patched/stock", summary["patched_over_stock"], summary["first_loss_rel_diff"],
                               summary["final_loss_gap"], width))
        for side in sides[2:]:  # --parts: every part on but one
            s = summary[side]
            rows.append(f"{side:<{width}}{_num(s['tokens_per_s'], '11.1f')}"
                        f"{_num(s['tokens_per_s_median_step'], '9.1f')}{_num(s['peak_mb'], '11.0f')}"
                        f"{_num(s['peak_above_start_mb'], '13.0f')}{s['first_loss']:>12.5f}{s['final_loss']:>12.5f}")
    if "over_stock" in summary:
        rows.append("")
        rows.append(f"{'against stock':<{width}}{'tokens/s':>11}{'median':>9}{'peak MB':>11}{'+MB in loop':>13}"
                    f"{'first loss':>12}{'final loss':>12}")
        for side, r in summary["over_stock"].items():
            rows.append(_ratio_row(f"{side}/stock", r, r["first_loss_rel_diff"], r["final_loss_gap"], width))
        rows.append("")
        rows.append(f"{'effect of a part':<{width}}{'tokens/s':>11}{'median':>9}{'peak MB':>11}{'+MB in loop':>13}")
        for part, r in summary["part_effect"].items():
            rows.append(_ratio_row(part, r, None, None, width))
    slow = {side: summary[side]["steps_over_3x_median"] for side in sides if summary[side]["steps_over_3x_median"]}
    if slow:
        rows.append("note: steps over 3x the median step time (" + ", ".join(f"{k} {v}" for k, v in slow.items()) +
                    "): something else was using this machine; the median is the steadier figure")
    rows.append("tokens/s: all timed steps (the first, warm-up, excluded); median: from the median step time")
    rows.append(f"peak MB: {memory_label}; +MB in loop: that peak minus the amount at the loop's start")
    if "patched_over_stock" in summary:
        rows.append("patched/stock row: ratios; first loss: relative difference; final loss: patched - stock")
    if "part_effect" in summary:
        rows.append("effect of a part: every part on / every part on but that one (patched / patched -<part>): "
                    "tokens/s above 1x = the part speeds the step up, peak below 1x = it saves memory")
    return "\n".join(rows)


def plot(path: Path, results: dict, summary: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(results)
    colors = {side: {"stock": "tab:gray", "patched": "tab:blue"}.get(side, f"C{i + 1}") for i, side in enumerate(sides)}
    styles = {"stock": dict(linewidth=2.5, alpha=0.8)}
    many = len(sides) > 2
    fig, axes = plt.subplots(1, 3, figsize=(16 if many else 14, 4.5 if many else 4),
                             gridspec_kw={"width_ratios": [2.2, 1.2 if many else 1, 1.2 if many else 1]})
    for side in sides:
        losses = results[side]["losses"]
        axes[0].plot(range(1, len(losses) + 1), losses, label=side, color=colors[side],
                     **styles.get(side, dict(linewidth=1.2, linestyle="--")))
    axes[0].set(xlabel="step", ylabel="training loss", title="loss (same batches)")
    axes[0].legend(fontsize=7 if many else None)
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    width = 0.8 / len(sides)
    panels = ((axes[1], "tokens/s (warm-up step excluded)", {"all timed steps": "tokens_per_s",
                                                              "median step": "tokens_per_s_median_step"}),
              (axes[2], "memory during training (MB)", {"peak": "peak_mb", "above loop start": "peak_above_start_mb"}))
    for ax, title_, keys in panels:
        for i, side in enumerate(sides):
            values = [summary[side][k] or 0.0 for k in keys.values()]
            bars = ax.bar([j + (i - (len(sides) - 1) / 2) * width for j in range(len(keys))], values, width,
                          label=side, color=colors[side])
            ax.bar_label(bars, fmt="%.0f", fontsize=6 if many else 8, rotation=90 if many else 0)
        ax.set_xticks(range(len(keys)), list(keys))
        ax.set_title(title_)  # colours as in the loss legend
        ax.margins(y=0.2 if many else 0.12)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
