"""The finetune job's figures: the summary of both sides (tokens/s, memory, losses), the
table it prints and the plot it saves."""

from __future__ import annotations

from pathlib import Path

from .presets import SIDES


def _tokens_per_s(result: dict, tokens_per_step: int, warmup: int) -> float | None:
    timed = result["step_s"][warmup:]
    return tokens_per_step * len(timed) / sum(timed) if timed and sum(timed) > 0 else None


def summarize(results: dict, tokens_per_step: int, warmup: int) -> dict:
    summary = {}
    for side, r in results.items():
        timed = sorted(r["step_s"][warmup:])
        median = timed[len(timed) // 2] if len(timed) % 2 else sum(timed[len(timed) // 2 - 1:][:2]) / 2
        summary[side] = {"tokens_per_s": _tokens_per_s(r, tokens_per_step, warmup),
                         "tokens_per_s_median_step": tokens_per_step / median if median > 0 else None,
                         "peak_mb": r["peak_mb"], "peak_above_start_mb": r["peak_above_start_mb"],
                         "first_loss": r["losses"][0], "final_loss": r["losses"][-1], "load_s": r["load_s"],
                         "steps_over_3x_median": sum(t > 3 * median for t in timed)}
    if len(results) == 2:
        s, p = summary["stock"], summary["patched"]

        def ratio(key):
            return p[key] / s[key] if p[key] is not None and s[key] else None

        summary["patched_over_stock"] = {k: ratio(k) for k in ("tokens_per_s", "tokens_per_s_median_step", "peak_mb",
                                                           "peak_above_start_mb")}
        summary["first_loss_rel_diff"] = abs(p["first_loss"] - s["first_loss"]) / abs(s["first_loss"])
        summary["final_loss_gap"] = p["final_loss"] - s["final_loss"]
        summary["same_lora_init"] = results["stock"]["lora_init_checksum"] == results["patched"]["lora_init_checksum"]
    return summary


def format_table(summary: dict, memory_label: str) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [f"{'':<16}{'tokens/s':>11}{'median':>9}{'peak MB':>11}{'+MB in loop':>13}"
            f"{'first loss':>12}{'final loss':>12}"]
    for side in SIDES:
        if side in summary:
            s = summary[side]
            rows.append(f"{side:<16}{num(s['tokens_per_s'], '11.1f')}{num(s['tokens_per_s_median_step'], '9.1f')}"
                        f"{num(s['peak_mb'], '11.0f')}"
                        f"{num(s['peak_above_start_mb'], '13.0f')}{s['first_loss']:>12.5f}{s['final_loss']:>12.5f}")
    if "patched_over_stock" in summary:
        r = summary["patched_over_stock"]

        def x(v):
            return "-" if v is None else f"{v:.2f}x"

        rows.append(f"{'patched/stock':<16}{x(r['tokens_per_s']):>11}{x(r['tokens_per_s_median_step']):>9}"
                    f"{x(r['peak_mb']):>11}"
                    f"{x(r['peak_above_start_mb']):>13}{summary['first_loss_rel_diff']:>12.1e}"
                    f"{summary['final_loss_gap']:>+12.5f}")
    slow = {side: summary[side]["steps_over_3x_median"] for side in SIDES if summary.get(side, {}).get(
        "steps_over_3x_median")}
    if slow:
        rows.append("note: steps over 3x the median step time (" + ", ".join(f"{k} {v}" for k, v in slow.items()) +
                    "): something else was using this machine; the median is the steadier figure")
    rows.append("tokens/s: all timed steps (the first, warm-up, excluded); median: from the median step time")
    rows.append(f"peak MB: {memory_label}; +MB in loop: that peak minus the amount at the loop's start")
    if "patched_over_stock" in summary:
        rows.append("patched/stock row: ratios; first loss: relative difference; final loss: patched - stock")
    return "\n".join(rows)


def plot(path: Path, results: dict, summary: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [s for s in SIDES if s in results]
    colors = {"stock": "tab:gray", "patched": "tab:blue"}
    styles = {"stock": dict(linewidth=2.5, alpha=0.8), "patched": dict(linewidth=1.2, linestyle="--")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    for side in sides:
        losses = results[side]["losses"]
        axes[0].plot(range(1, len(losses) + 1), losses, label=side, color=colors[side], **styles[side])
    axes[0].set(xlabel="step", ylabel="training loss", title="loss (same batches)")
    axes[0].legend()
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    width = 0.38
    panels = ((axes[1], "tokens/s (warm-up step excluded)", {"all timed steps": "tokens_per_s",
                                                              "median step": "tokens_per_s_median_step"}),
              (axes[2], "memory during training (MB)", {"peak": "peak_mb", "above loop start": "peak_above_start_mb"}))
    for ax, title_, keys in panels:
        for i, side in enumerate(sides):
            values = [summary[side][k] or 0.0 for k in keys.values()]
            bars = ax.bar([j + (i - (len(sides) - 1) / 2) * width for j in range(len(keys))], values, width,
                          label=side, color=colors[side])
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(keys)), list(keys))
        ax.set_title(title_)  # colours as in the loss legend
        ax.margins(y=0.12)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
